"""Background work: the lease queue in the database (jobs and agent tasks), the workers that run jobs,
the job kinds and the handlers registered for them."""
