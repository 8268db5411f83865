"""Database layer: declarative models, engines and sessions, and migrations."""
