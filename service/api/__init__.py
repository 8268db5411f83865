"""HTTP API: the FastAPI routes, dependencies, middleware and the one JSON error shape."""
