"""The device agent: say hello to an lpnet server, lease measurement tasks, run them, post the results.

Runs on the device, with only the profiler installed (HTTP through httpx, nothing of the service):

    lpnet agent --server http://server:8000 --token $AGENT_KEY
    python -m profiler.agent --server http://server:8000 --token $ADMIN_KEY --device edge-1

With the device's agent key the device is the key's. With an admin key and ``--device NAME`` the
agent registers the device from this machine (or reuses it), creates an agent key for it and keeps
that key in its state directory, so a restart needs the admin key no more.

Tasks: a profile campaign (measure width variants and layers of model families; the measurements
go to ``/v1/devices/{id}/profiles`` in batches through `HttpSink`, with idempotency keys and a disk
spool), or a verify (measure one whole network for a plan). Everything that must reach the server
is on disk first: campaign rows in the sink's journal and spool, task results in an outbox; while
the server is unreachable they wait there and the agent retries.

Resuming: the state directory keeps the agent id and the current task. After a restart the server
hands the agent its own unexpired task again, the sink's journal and the sample keys the server
already holds are skipped, so nothing is measured or stored twice. SIGTERM and SIGINT stop the agent
cleanly: the measurement in flight is dropped, the spool gets one delivery attempt, the lease is
kept for a restart (or lapses, and another agent takes the task over).

Modules: `config` (what the agent was told), `client` (HTTP calls and their errors), `state` (the
state file), `loop` (connecting, leasing, signals), `heartbeat` (lease renewal), `host` (what the
task runners get from the loop), `campaign` and `verify` (the two task kinds), `outbox` (results on
disk until delivered), `cli` (flags). `options` holds a profiling run's options, shared with the
service's `lpnet profile`; `standalone` profiles this machine once, without a server's tasks.

The package imports nothing itself, and `cli` needs only httpx: `lpnet agent` registers its flags
without loading torch.
"""
