"""lpnet service: HTTP API, database, jobs and the `lpnet` command line."""
