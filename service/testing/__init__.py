"""Harnesses that run the real service for the test suite and the benchmarks alike.

`postgres` (a scratch database, the local cluster), `tiny` (a tiny real network, its measurements
and a predictor fitted on them), `processes` (`lpnet serve` and `lpnet worker` as subprocesses on
loopback), `stored` (what a scenario reads back from the database), and the failure scenarios
`worker_kill`, `db_restart` and `submitters`. Nothing in the service imports this package.
"""
