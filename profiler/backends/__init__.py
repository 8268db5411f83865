"""Measurement backends: a small ABC and a registry of named implementations."""

from profiler.backends.base import (
    Backend,
    Runnable,
    available_backends,
    describe_backends,
    get_backend,
    register_backend,
    registered_backends,
)

__all__ = [
    "Backend",
    "Runnable",
    "available_backends",
    "describe_backends",
    "get_backend",
    "register_backend",
    "registered_backends",
]
