"""Background jobs: a queue in the database, workers that lease jobs from it, and the tasks they run."""
