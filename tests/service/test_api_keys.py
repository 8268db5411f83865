"""API keys: format and hashing, authentication, and the scope dependencies of the API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.api.deps import AdminKey, AgentKey, CurrentKey, ReaderKey
from service.auth import (
    PREFIX_LENGTH,
    KeyCache,
    authenticate_api_key,
    create_api_key,
    generate_api_key,
    hash_api_key,
    key_prefix,
    revoke_api_key,
    verify_api_key,
)
from service.config import Settings
from service.db.base import utcnow
from service.db.models import ApiKey, Device
from service.db.session import make_engine, make_session_factory
from service.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from service.main import create_app
from tests.service.support import Api


def test_generated_keys_are_random_prefixed_and_hashed() -> None:
    generated = {generate_api_key() for _ in range(50)}
    assert len({item.key for item in generated}) == 50
    for item in generated:
        assert item.key.startswith("lpn_") and len(item.key) == 4 + 43
        assert item.prefix == item.key[:PREFIX_LENGTH] == key_prefix(item.key)
        assert item.key_hash == hash_api_key(item.key) and len(item.key_hash) == 64
        assert verify_api_key(item.key, item.key_hash)
        assert not verify_api_key(item.key[:-1], item.key_hash)


def add_device(session: Session, name: str = "pi4") -> Device:
    device = Device(name=name, hardware="Cortex-A72", backend="torch-cpu", threads=4, batch_size=1)
    session.add(device)
    session.flush()
    return device


def test_create_and_authenticate(session: Session) -> None:
    row, key = create_api_key(session, scope="reader", name="ci")
    session.commit()
    assert row.last_used_at is None

    found = authenticate_api_key(session, key)
    assert found.id == row.id
    first_use = found.last_used_at
    assert first_use is not None

    # Within the resolution, last_used_at is not rewritten on every request.
    assert authenticate_api_key(session, key, now=first_use + timedelta(seconds=5)).last_used_at == first_use
    later = first_use + timedelta(minutes=2)
    assert authenticate_api_key(session, key, now=later).last_used_at == later


def test_authentication_failures(session: Session) -> None:
    row, key = create_api_key(session, scope="admin")
    session.commit()
    with pytest.raises(Unauthenticated, match="malformed"):
        authenticate_api_key(session, "not-a-key")
    with pytest.raises(Unauthenticated, match="unknown"):
        authenticate_api_key(session, generate_api_key().key)

    revoke_api_key(session, row.prefix)
    session.commit()
    with pytest.raises(Unauthenticated, match="revoked"):
        authenticate_api_key(session, key)


def test_a_stored_placeholder_admin_key_is_refused(session: Session) -> None:
    # The old public default (too short for a generated key), and a long one with the same word.
    for placeholder, reason in (
        ("lpn_change-me-change-me-change-me-change-me", "must look like the keys lpnet makes"),
        ("lpn_change-me-" + generate_api_key().key[4:], "placeholder"),
    ):
        session.add(
            ApiKey(
                name="configured",
                prefix=key_prefix(placeholder),
                key_hash=hash_api_key(placeholder),
                scope="admin",
            )
        )
        session.commit()
        with pytest.raises(Unauthenticated, match=reason) as info:
            authenticate_api_key(session, placeholder)
        assert placeholder not in info.value.message and "lpnet keys revoke" in info.value.message
    # A generated admin key still works.
    row, key = create_api_key(session, scope="admin")
    session.commit()
    assert authenticate_api_key(session, key).id == row.id


def test_create_api_key_validates_scope_device_and_name(session: Session) -> None:
    device = add_device(session)
    with pytest.raises(InvalidInput, match="unknown key scope 'owner'"):
        create_api_key(session, scope="owner")
    with pytest.raises(InvalidInput, match="one device"):
        create_api_key(session, scope="agent")
    with pytest.raises(InvalidInput, match="only agent keys"):
        create_api_key(session, scope="reader", device=device)
    with pytest.raises(InvalidInput, match="at most 128"):
        create_api_key(session, scope="reader", name="x" * 129)
    row, _ = create_api_key(session, scope="agent", device=device)
    assert row.device_id == device.id and row.name == "agent@pi4"


def test_revoke_by_prefix_or_full_key(session: Session) -> None:
    first, first_key = create_api_key(session, scope="reader")
    second, _ = create_api_key(session, scope="reader")
    # Simulate two keys whose first characters collide: the full key then picks the right one.
    colliding_key = first_key[:PREFIX_LENGTH] + generate_api_key().key[PREFIX_LENGTH:]
    second.prefix, second.key_hash = first.prefix, hash_api_key(colliding_key)
    session.commit()
    with pytest.raises(Conflict, match="share the prefix"):
        revoke_api_key(session, first.prefix)
    assert revoke_api_key(session, colliding_key).id == second.id
    assert revoke_api_key(session, first.prefix).id == first.id
    with pytest.raises(Conflict, match="already revoked"):
        revoke_api_key(session, first.prefix)
    with pytest.raises(InvalidInput, match="too short"):
        revoke_api_key(session, "lpn_")
    with pytest.raises(NotFound):
        revoke_api_key(session, "lpn_00000000")


@pytest.fixture
def scoped_app(sqlite_migrated_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app with one route per scope, and a key of each scope."""
    app: FastAPI = create_app(Settings(database_url=sqlite_migrated_url))

    @app.get("/test/whoami")
    def whoami(key: CurrentKey) -> dict[str, str]:
        return {"scope": key.scope}

    @app.get("/test/admin")
    def admin_only(key: AdminKey) -> dict[str, str]:
        return {"scope": key.scope}

    @app.get("/test/read")
    def read(key: ReaderKey) -> dict[str, str]:
        return {"scope": key.scope}

    @app.get("/test/submit")
    def submit(key: AgentKey) -> dict[str, int | None]:
        return {"device_id": key.device_id}

    engine = make_engine(sqlite_migrated_url)
    with make_session_factory(engine)() as session:
        device = add_device(session)
        keys = {
            scope: create_api_key(session, scope=scope, device=device if scope == "agent" else None)[1]
            for scope in ("admin", "agent", "reader")
        }
        session.commit()
    engine.dispose()
    with TestClient(app) as client:
        yield client, keys


def test_requests_need_a_valid_key(scoped_app: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = scoped_app
    missing = client.get("/test/whoami")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"] == "Bearer"

    bad = client.get("/test/whoami", headers={"Authorization": f"Bearer {generate_api_key().key}"})
    assert bad.status_code == 401 and bad.json()["error"]["message"] == "unknown API key"

    bearer = client.get("/test/whoami", headers={"Authorization": f"Bearer {keys['reader']}"})
    assert bearer.json() == {"scope": "reader"}
    header = client.get("/test/whoami", headers={"X-API-Key": keys["agent"]})
    assert header.json() == {"scope": "agent"}


def test_scopes_are_enforced(scoped_app: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = scoped_app

    def status(path: str, scope: str) -> int:
        return client.get(path, headers={"X-API-Key": keys[scope]}).status_code

    assert [status("/test/admin", scope) for scope in ("admin", "agent", "reader")] == [200, 403, 403]
    assert [status("/test/read", scope) for scope in ("admin", "agent", "reader")] == [200, 403, 200]
    assert [status("/test/submit", scope) for scope in ("admin", "agent", "reader")] == [200, 200, 403]

    denied = client.get("/test/admin", headers={"X-API-Key": keys["reader"]}).json()["error"]
    assert denied["code"] == "permission_denied"
    assert denied["details"] == {"scope": "reader", "allowed": ["admin"]}


def test_authenticated_requests_record_last_use(
    scoped_app: tuple[TestClient, dict[str, str]], sqlite_migrated_url: str
) -> None:
    client, keys = scoped_app
    before = utcnow()
    assert client.get("/test/whoami", headers={"X-API-Key": keys["reader"]}).status_code == 200
    engine = make_engine(sqlite_migrated_url)
    with make_session_factory(engine)() as session:
        row = session.query(ApiKey).filter_by(key_hash=hash_api_key(keys["reader"])).one()
        assert row.last_used_at is not None and row.last_used_at >= before - timedelta(seconds=1)
    engine.dispose()


# The key cache and revocations ---------------------------------------------------------------------------


def test_a_check_from_before_a_clear_is_not_cached() -> None:
    cache = KeyCache(ttl_seconds=60)
    row = ApiKey(name="k", prefix="lpn_abcdefgh", key_hash="0" * 64, scope="reader")
    key = generate_api_key().key
    generation = cache.generation  # read before the database check
    cache.clear()  # a revocation lands while the check runs
    cache.put(key, row, generation)
    assert cache.get(key) is None
    assert cache.generation == generation + 1
    # A check that started after the clear is cached.
    cache.put(key, row, cache.generation)
    assert cache.get(key) is row


def test_a_key_revoked_during_its_check_stops_working_at_once(api: Api) -> None:
    reader = api.keys.reader
    assert api.get("/v1/devices", key="reader").status_code == 200
    cache: KeyCache = api.app.state.key_cache
    cache.clear()
    # A request's key check: the generation, then the database, which still finds the key active...
    generation = cache.generation
    with api.factory() as session:
        row = authenticate_api_key(session, reader)
        session.commit()
    # ...while an admin revokes it through the API before the check fills the cache.
    assert api.delete(f"/v1/keys/{key_prefix(reader)}", key="admin").status_code == 200
    cache.put(reader, row, generation)
    refused = api.get("/v1/devices", key="reader")
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
