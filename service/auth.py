"""API keys: generation, hashing, verification, and the service functions that store and check them.

A key looks like ``lpn_<43 url-safe characters>`` (256 random bits). Only its sha256 is stored; a
plain hash is enough because the key is random, not a password a person chose. The first
`PREFIX_LENGTH` characters are stored too so people can tell keys apart and revoke one by prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import admin_key_problem
from service.db.base import utcnow
from service.db.models import ApiKey, Device, KeyScope
from service.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from service.pagination import Keyset, Page, PageRequest, paginate

KEY_MARKER = "lpn_"
PREFIX_LENGTH = len(KEY_MARKER) + 8
# Writing last_used_at on every request would turn every read into a write; a minute is precise enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_NAME_LENGTH = 128


@dataclass(frozen=True)
class GeneratedKey:
    """A freshly generated key: show `key` once, store `prefix` and `key_hash`."""

    key: str
    prefix: str
    key_hash: str


def generate_api_key() -> GeneratedKey:
    """Generate a random API key together with its public prefix and hash."""
    key = KEY_MARKER + secrets.token_urlsafe(32)
    return GeneratedKey(key=key, prefix=key_prefix(key), key_hash=hash_api_key(key))


def hash_api_key(key: str) -> str:
    """Return the sha256 hex digest under which `key` is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    """Return the public prefix of `key` (``lpn_`` and the next 8 characters)."""
    return key[:PREFIX_LENGTH]


def verify_api_key(key: str, key_hash: str) -> bool:
    """Whether `key` hashes to `key_hash` (compared in constant time)."""
    return hmac.compare_digest(hash_api_key(key), key_hash)


def parse_scope(value: str) -> KeyScope:
    """Return the scope named `value`.

    Raises:
        InvalidInput: `value` is not one of admin, agent, reader.
    """
    try:
        return KeyScope(value)
    except ValueError:
        choices = ", ".join(scope.value for scope in KeyScope)
        raise InvalidInput(f"unknown key scope {value!r}; choose one of {choices}") from None


def create_api_key(
    session: Session, *, scope: str, name: str | None = None, device: Device | None = None
) -> tuple[ApiKey, str]:
    """Create and add an API key (the caller commits).

    Args:
        session: Open session.
        scope: admin, agent or reader.
        name: Label for people; defaults to the scope (and device for agent keys).
        device: The device an agent key submits measurements for; required for agent keys and
            refused for the others.

    Returns:
        The stored row and the raw key, which is not kept anywhere and must be shown to the user now.

    Raises:
        InvalidInput: Unknown scope, missing or unexpected device, or a name that is too long.
    """
    key_scope = parse_scope(scope)
    if key_scope is KeyScope.AGENT and device is None:
        raise InvalidInput("an agent key submits measurements for one device; name the device")
    if key_scope is not KeyScope.AGENT and device is not None:
        raise InvalidInput(f"only agent keys belong to a device, not {key_scope.value} keys")
    label = (name or "").strip() or (f"agent@{device.name}" if device is not None else key_scope.value)
    if len(label) > MAX_NAME_LENGTH:
        raise InvalidInput(f"key name is {len(label)} characters long; at most {MAX_NAME_LENGTH} allowed")

    generated = generate_api_key()
    row = ApiKey(
        name=label,
        prefix=generated.prefix,
        key_hash=generated.key_hash,
        scope=key_scope.value,
        device=device,
    )
    session.add(row)
    session.flush()
    return row, generated.key


def list_api_keys(session: Session, *, include_revoked: bool = True) -> list[ApiKey]:
    """Return the API keys, oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


# Keys are listed oldest first: in the order of their ids.
API_KEY_LIST = Keyset("keys", ApiKey.id)


def page_api_keys(session: Session, page: PageRequest) -> Page[ApiKey]:
    """A page of the API keys, oldest first."""
    return paginate(session, select(ApiKey), API_KEY_LIST, page)


def revoke_api_key(session: Session, prefix: str, *, now: datetime | None = None) -> ApiKey:
    """Revoke the active key whose prefix is `prefix` (the caller commits).

    Raises:
        InvalidInput: The prefix is shorter than the stored prefix.
        NotFound: No key has this prefix.
        Conflict: The key is already revoked, or several active keys share the prefix (pass the full
            key then).
    """
    prefix = prefix.strip()
    if len(prefix) < PREFIX_LENGTH:
        raise InvalidInput(
            f"key prefix {prefix!r} is too short; give the {PREFIX_LENGTH}-character prefix "
            "shown by `lpnet keys list`"
        )
    stored_prefix = key_prefix(prefix)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == stored_prefix, ApiKey.revoked_at.is_(None))
    ).all()
    # A full key (or more of it than the stored prefix) narrows the match down by hash.
    if len(prefix) > PREFIX_LENGTH:
        candidates = [key for key in candidates if verify_api_key(prefix, key.key_hash)]
    if not candidates:
        revoked = session.scalars(
            select(ApiKey).where(ApiKey.prefix == stored_prefix, ApiKey.revoked_at.is_not(None))
        ).first()
        if revoked is not None and revoked.revoked_at is not None:
            raise Conflict(f"API key {revoked.prefix} is already revoked ({revoked.revoked_at.isoformat()})")
        raise NotFound(f"no active API key with prefix {prefix!r}; see `lpnet keys list`")
    if len(candidates) > 1:
        raise Conflict(
            f"{len(candidates)} active keys share the prefix {prefix!r}; pass the full key to revoke one"
        )
    key = candidates[0]
    key.revoked_at = now or utcnow()
    session.flush()
    return key


def authenticate_api_key(session: Session, key: str, *, now: datetime | None = None) -> ApiKey:
    """Return the active key row for a raw key, updating its ``last_used_at`` (the caller commits).

    Raises:
        Unauthenticated: The key is malformed, unknown or revoked.
    """
    if not key.startswith(KEY_MARKER) or len(key) <= PREFIX_LENGTH:
        raise Unauthenticated("malformed API key; expected a key starting with 'lpn_'")
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).one_or_none()
    if row is None:
        raise Unauthenticated("unknown API key")
    if row.revoked_at is not None:
        raise Unauthenticated(f"API key {row.prefix} was revoked at {row.revoked_at.isoformat()}")
    if row.scope == KeyScope.ADMIN:
        # Older databases may hold a placeholder admin key that was configured before such keys
        # were refused at start-up; anyone who read the public default could use it.
        problem = admin_key_problem(key)
        if problem is not None:
            raise Unauthenticated(
                f"admin key {row.prefix} {problem}; revoke it (`lpnet keys revoke {row.prefix}`) and create "
                "a new one with `lpnet keys create --scope admin`"
            )
    now = now or utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    return row


def require_scope(key: ApiKey, allowed: Iterable[str]) -> None:
    """Check that `key` may do what needs one of the `allowed` scopes; admin keys may do everything.

    Raises:
        PermissionDenied: The key's scope is not allowed.
    """
    allowed_scopes = {KeyScope(scope) for scope in allowed}
    if key.scope == KeyScope.ADMIN or key.scope in allowed_scopes:
        return
    needed = " or ".join(sorted(scope.value for scope in allowed_scopes | {KeyScope.ADMIN}))
    raise PermissionDenied(
        f"API key {key.prefix} has scope {key.scope!r}; this needs {needed}",
        {"scope": key.scope, "allowed": sorted(scope.value for scope in allowed_scopes)},
    )


def require_device_key(key: ApiKey, device: Device) -> None:
    """Check that an agent key belongs to `device` (admin keys may act for any device).

    Raises:
        PermissionDenied: An agent key of another device.
    """
    if key.scope == KeyScope.AGENT and key.device_id != device.id:
        raise PermissionDenied(
            f"API key {key.prefix} is the agent key of another device; it may only act for its own "
            f"device, not {device.name!r}",
            {"device": device.name},
        )


class KeyCache:
    """Keys that authenticated recently, by hash, for `ttl_seconds` (thread-safe).

    Checking a key costs a database query; with this cache a busy client costs one per `ttl_seconds`.
    The price: a key revoked by another process (`lpnet keys revoke`, another server) keeps working
    here for at most `ttl_seconds`, since nothing tells this process about it; revoking through this
    process's API clears the cache at once. Only successful checks are cached, so a new key works at
    once and a wrong one is never remembered.

    A check that read the key from the database before a `clear` must not put it back afterwards (the
    key may be the one just revoked): the caller reads `generation` before its database check and
    passes it to `put`, which drops the row if the cache was cleared since::

        generation = cache.generation
        row = authenticate_api_key(session, key)  # the database check
        cache.put(key, row, generation)

    Args:
        ttl_seconds: How long a key is trusted without asking the database; 0 turns the cache off.
        clock: Seconds from an arbitrary start (tests pass a fake one).
    """

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """How many times the cache was cleared; read it before checking a key in the database."""
        with self._lock:
            return self._generation

    def get(self, key: str) -> ApiKey | None:
        """The cached row of `key` if it was checked less than `ttl_seconds` ago."""
        if self.ttl_seconds <= 0:
            return None
        digest = hash_api_key(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if self._clock() - entry[0] >= self.ttl_seconds:
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, key: str, row: ApiKey, generation: int) -> None:
        """Remember that `key` authenticated as `row` (a row detached from its session).

        Args:
            key: The raw key.
            row: Its row, as the database check returned it.
            generation: `generation` as read before that check; when the cache was cleared since, the
                row may predate a revocation and is not kept.
        """
        if self.ttl_seconds <= 0:
            return
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[hash_api_key(key)] = (self._clock(), row)

    def clear(self) -> None:
        """Forget every key (after a revocation), and every check still under way."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
