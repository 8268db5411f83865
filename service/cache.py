"""A small thread-safe LRU cache whose misses are computed once, even when requested concurrently."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class _Failure:
    """A remembered error, stored in place of a value."""

    error: Exception


class LruCache(Generic[K, V]):
    """Keeps the `capacity` most recently used values.

    `get_or_compute` holds a per-key lock while computing, so two requests for the same missing key
    (say, tracing resnet50) do the work once; different keys compute in parallel. Errors of the
    types in `remember_errors` are stored like values: a key whose computation failed that way fails
    again with the same error, without computing, until it leaves the cache.
    """

    def __init__(self, capacity: int, remember_errors: tuple[type[Exception], ...] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.remember_errors = remember_errors
        self._values: OrderedDict[K, V | _Failure] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The cached value, None when absent; a remembered error is raised again."""
        with self._lock:
            if key not in self._values:
                return None
            self._values.move_to_end(key)
            self.hits += 1
            entry = self._values[key]
        if isinstance(entry, _Failure):
            raise _replay(entry.error)
        return entry

    def put(self, key: K, value: V) -> None:
        self._store(key, value)

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:
                value = self.get(key)  # computed by another thread while this one waited
                if value is not None:
                    return value
                with self._lock:
                    self.misses += 1
                try:
                    value = compute()
                except self.remember_errors as exc:
                    self._store(key, _Failure(_replay(exc)))
                    raise
                self._store(key, value)
                return value
        finally:
            with self._lock:
                self._key_locks.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def _store(self, key: K, entry: V | _Failure) -> None:
        with self._lock:
            self._values[key] = entry
            self._values.move_to_end(key)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)


def _replay(error: Exception) -> Exception:
    """A fresh instance of `error`: same class, arguments and attributes, without its traceback.

    Raising a copy keeps the stored error from collecting the traceback of every request that
    re-raises it (and the frames those hold).
    """
    clone = type(error).__new__(type(error), *error.args)
    clone.__dict__.update(error.__dict__)
    return clone
