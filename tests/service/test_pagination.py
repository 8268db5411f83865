"""Cursor pagination of every list endpoint, on SQLite and PostgreSQL: walking the pages returns each
item once and in the list's order, items added between requests are neither repeated nor skipped,
cursors are bound to their list and filters (422 naming `cursor` otherwise), and the client and
`lpnet device list --server` read every page of a real server on loopback."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from lpnet.client import Client
from service.auth import create_api_key, hash_api_key
from service.config import Settings, WorkerSettings
from service.db.models import AgentTask, ApiKey, Device, Job, JobStatus, KeyScope, TaskKind, TaskStatus
from service.main import create_app
from service.predictors import FittedPredictor, store_predictor
from tests.service.support import Api, api_client, tiny_device
from tests.service.test_cli_commands import run_cli

LiveServer = Callable[[FastAPI], AbstractContextManager[str]]
PAGE = 3
# Added devices get names unique within a test however often it adds some.
_serial = itertools.count()


# Rows, written straight into the database --------------------------------------------------------------


def key_id(api: Api, raw: str) -> int:
    with api.factory() as session:
        found = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(raw)))
        assert found is not None
        return found


def add_devices(api: Api, names: list[str]) -> list[str]:
    with api.factory() as session:
        session.add_all(tiny_device(name) for name in names)
        session.commit()
    return names


def add_keys(api: Api, count: int) -> list[int]:
    with api.factory() as session:
        rows = [create_api_key(session, scope=KeyScope.READER.value)[0] for _ in range(count)]
        session.commit()
        return [row.id for row in rows]


def add_predictors(api: Api, count: int, device_id: int | None = None) -> list[int]:
    fitted = FittedPredictor(b"artifact", {"mape": 0.1}, None, "fingerprint", 1, 10, 0.1)
    with api.factory() as session:
        rows = [store_predictor(session, device_id or api.device_id, fitted) for _ in range(count)]
        session.commit()
        return [row.version for row in rows]


def add_jobs(
    api: Api, count: int, *, kind: str = "fit", status: str = JobStatus.QUEUED, **values: Any
) -> list[int]:
    with api.factory() as session:
        rows = [
            Job(kind=kind, status=status, device_id=api.device_id, input={"budget_ms": 1.0, "options": {}})
            for _ in range(count)
        ]
        for row in rows:
            for name, value in values.items():
                setattr(row, name, value)
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


def add_plans(api: Api, count: int, *, key: str = "reader", **values: Any) -> list[int]:
    return add_jobs(api, count, kind="plan", key_id=key_id(api, getattr(api.keys, key)), **values)


def add_tasks(api: Api, count: int, status: str = TaskStatus.QUEUED) -> list[int]:
    with api.factory() as session:
        rows = [
            AgentTask(device_id=api.device_id, kind=TaskKind.PROFILE_CAMPAIGN, status=status, payload={})
            for _ in range(count)
        ]
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


# The lists --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A list endpoint: how to add `count` items (returning how the list names them), and its order."""

    path: str
    key: str
    field: str
    add: Callable[[Api, int], list[Any]]
    newest_first: bool

    def existing(self, api: Api) -> list[Any]:
        """What the list holds before a test adds anything (the fixture's device and keys)."""
        if self.path == "/v1/devices":
            return [api.device_name]
        if self.path == "/v1/keys":
            with api.factory() as session:
                return list(session.scalars(select(ApiKey.id)))
        return []

    def expected(self, items: list[Any]) -> list[Any]:
        """`items` in the list's order, sorted here rather than by the server."""
        return sorted(items, reverse=self.newest_first)


LISTINGS = {
    "devices": Listing(
        "/v1/devices",
        "reader",
        "name",
        lambda api, n: add_devices(api, [f"dev-{next(_serial):04d}" for _ in range(n)]),
        newest_first=False,
    ),
    "keys": Listing("/v1/keys", "admin", "id", add_keys, newest_first=False),
    "predictors": Listing("/v1/devices/tiny-cpu/predictors", "reader", "version", add_predictors, True),
    "jobs": Listing("/v1/jobs", "reader", "id", add_jobs, newest_first=True),
    "plans": Listing("/v1/plans", "reader", "id", add_plans, newest_first=True),
    "tasks": Listing("/v1/devices/tiny-cpu/tasks", "reader", "id", add_tasks, newest_first=True),
}


def get_page(api: Api, listing: Listing, **params: Any) -> dict[str, Any]:
    response = api.get(listing.path, key=listing.key, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"items", "next_cursor"}
    return body


def walk(api: Api, listing: Listing, cursor: str | None = None, **params: Any) -> list[list[Any]]:
    """The pages of the list from `cursor` on, as lists of the items' identifying field."""
    pages = []
    while True:
        body = get_page(api, listing, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([item[listing.field] for item in body["items"]])
        assert len(pages) < 100, "the pages never end"
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def assert_cursor_refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and "cursor" in error["message"]
    [problem] = error["details"]["errors"]
    assert problem["field"] == "query.cursor" and words in problem["message"]


# Through the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LISTINGS))
def test_walking_the_pages_returns_every_item_once_in_order(api: Api, name: str) -> None:
    listing = LISTINGS[name]
    items = listing.existing(api) + listing.add(api, 7)
    pages = walk(api, listing, limit=PAGE)
    assert [len(page) for page in pages] == [PAGE] * (len(items) // PAGE) + (
        [len(items) % PAGE] if len(items) % PAGE else []
    )
    walked = [item for page in pages for item in page]
    assert walked == listing.expected(items)
    # One page with room for everything holds the same items in the same order, and is the last.
    whole = get_page(api, listing, limit=500)
    assert [item[listing.field] for item in whole["items"]] == walked and whole["next_cursor"] is None


@pytest.mark.parametrize("name", ["predictors", "jobs", "plans", "tasks"])
def test_newest_first_lists_neither_repeat_nor_skip_items_added_between_pages(api: Api, name: str) -> None:
    listing = LISTINGS[name]
    before = listing.add(api, 7)
    first = get_page(api, listing, limit=PAGE)
    added = listing.add(api, 2)
    rest = walk(api, listing, first["next_cursor"], limit=PAGE)
    walked = [item[listing.field] for item in first["items"]] + [item for page in rest for item in page]
    # The walk lists exactly what there was when it started; a new walk starts with the new items.
    assert walked == listing.expected(before)
    assert [item for page in walk(api, listing, limit=PAGE) for item in page] == listing.expected(
        before + added
    )


def test_oldest_first_lists_reach_items_added_at_their_end(api: Api) -> None:
    keys = LISTINGS["keys"]
    before = keys.existing(api) + keys.add(api, 4)
    first = get_page(api, keys, limit=PAGE)
    added = keys.add(api, 2)
    rest = walk(api, keys, first["next_cursor"], limit=PAGE)
    walked = [item["id"] for item in first["items"]] + [item for page in rest for item in page]
    assert walked == sorted(before + added)

    devices = LISTINGS["devices"]
    add_devices(api, ["dev-b", "dev-c", "dev-d", "dev-e"])
    first = get_page(api, devices, limit=PAGE)
    assert [item["name"] for item in first["items"]] == ["dev-b", "dev-c", "dev-d"]
    # Devices are listed by name: a new one after the cursor is reached, one before it is not repeated.
    add_devices(api, ["dev-a", "zz-last"])
    rest = walk(api, devices, first["next_cursor"], limit=PAGE)
    assert [item for page in rest for item in page] == ["dev-e", "tiny-cpu", "zz-last"]


@pytest.mark.parametrize("name", list(LISTINGS))
def test_a_bad_cursor_is_422_naming_it(api: Api, name: str) -> None:
    listing = LISTINGS[name]
    listing.add(api, 2)
    other = LISTINGS["jobs" if name != "jobs" else "keys"]
    other.add(api, 2)
    foreign = get_page(api, other, limit=1)["next_cursor"]
    assert foreign is not None
    assert_cursor_refused(api.get(listing.path, key=listing.key, params={"cursor": foreign}), "another list")

    def encoded(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    own = get_page(api, listing, limit=1)["next_cursor"]
    assert own is not None
    payload = json.loads(base64.urlsafe_b64decode(own + "=" * (-len(own) % 4)))
    # Keys the list cannot hold: of the other type, out of range, or text the database cannot compare.
    if isinstance(payload["k"], int):
        wrong_keys: list[Any] = [0, -1, 2**31, True, 1.5, "7", [1], None]
    else:
        wrong_keys = [1, "", "x" * 129, "a\x00", "\ud800", [1], None]
    for bad in (
        "garbage!",
        "é",
        encoded(b"not json"),
        encoded(b"[1, 2]"),
        encoded(json.dumps({**payload, "extra": 1}).encode()),
        *(encoded(json.dumps({**payload, "k": key}).encode()) for key in wrong_keys),
    ):
        response = api.get(listing.path, key=listing.key, params={"cursor": bad})
        assert_cursor_refused(response, "not a cursor this server issued")
    too_long = api.get(listing.path, key=listing.key, params={"cursor": "a" * 513})
    assert too_long.status_code == 422
    assert too_long.json()["error"]["details"]["errors"][0]["field"] == "query.cursor"
    for limit in (0, 501, "many"):
        refused = api.get(listing.path, key=listing.key, params={"limit": limit})
        assert refused.status_code == 422
        assert refused.json()["error"]["details"]["errors"][0]["field"] == "query.limit"


def test_a_cursor_is_refused_with_other_filters(api: Api) -> None:
    add_jobs(api, 3, status=JobStatus.FAILED)
    cursor = get_page(api, LISTINGS["jobs"], limit=1, status="failed")["next_cursor"]
    for other in ({}, {"status": "queued"}, {"status": "failed", "kind": "fit"}):
        response = api.get("/v1/jobs", key="reader", params={"cursor": cursor, **other})
        assert_cursor_refused(response, "other filters")
    same = get_page(api, LISTINGS["jobs"], limit=1, status="failed", cursor=cursor)
    assert len(same["items"]) == 1

    # A device's predictors and tasks: a cursor of one device is not one of another.
    other_id, _ = api.add_device("edge-1")
    add_predictors(api, 2)
    add_predictors(api, 2, other_id)
    cursor = get_page(api, LISTINGS["predictors"], limit=1)["next_cursor"]
    assert_cursor_refused(
        api.get("/v1/devices/edge-1/predictors", params={"cursor": cursor}), "other filters"
    )
    add_tasks(api, 2)
    cursor = get_page(api, LISTINGS["tasks"], limit=1)["next_cursor"]
    assert_cursor_refused(api.get("/v1/devices/edge-1/tasks", params={"cursor": cursor}), "other filters")
    refused = api.get("/v1/devices/tiny-cpu/tasks", params={"cursor": cursor, "status": "queued"})
    assert_cursor_refused(refused, "other filters")

    # Plans are the caller's: another key's cursor is not this key's.
    add_plans(api, 2)
    cursor = get_page(api, LISTINGS["plans"], limit=1)["next_cursor"]
    assert_cursor_refused(api.get("/v1/plans", key="admin", params={"cursor": cursor}), "other filters")


def test_the_default_page_is_100_items(api: Api) -> None:
    ids = add_jobs(api, 101)
    first = get_page(api, LISTINGS["jobs"])
    assert [job["id"] for job in first["items"]] == sorted(ids, reverse=True)[:100]
    last = get_page(api, LISTINGS["jobs"], cursor=first["next_cursor"])
    assert [job["id"] for job in last["items"]] == [min(ids)] and last["next_cursor"] is None


def test_plans_lists_the_callers_plans_by_device_and_status(api: Api) -> None:
    other_id, _ = api.add_device("edge-1")
    mine = add_plans(api, 3)
    succeeded = add_plans(api, 2, device_id=other_id, status=JobStatus.SUCCEEDED)
    admins = add_plans(api, 1, key="admin")
    add_jobs(api, 2)  # fits are no plans

    def plan_ids(key: str = "reader", **params: Any) -> list[int]:
        listing = dataclasses.replace(LISTINGS["plans"], key=key)
        return [plan for page in walk(api, listing, limit=2, **params) for plan in page]

    assert plan_ids() == sorted(mine + succeeded, reverse=True)
    assert plan_ids(device="edge-1") == plan_ids(device=str(other_id)) == sorted(succeeded, reverse=True)
    assert plan_ids(status="succeeded") == sorted(succeeded, reverse=True)
    assert plan_ids(device="tiny-cpu", status="succeeded") == []
    assert plan_ids("admin") == admins
    listed = api.get("/v1/plans", key="reader", params={"device": "edge-1"}).json()["items"][0]
    assert listed == api.get(f"/v1/plans/{listed['id']}", key="reader").json()
    unknown = api.get("/v1/plans", key="reader", params={"device": "nowhere"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    # A filter no name or kind can match is refused before it reaches the database.
    for path, name in (("/v1/plans", "device"), ("/v1/jobs", "kind")):
        refused = api.get(path, key="reader", params={name: "a\x00b"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["details"]["errors"][0]["field"] == f"query.{name}"
    assert api.get("/v1/plans", key=None).status_code == 401


# The client and the CLI against a live server ---------------------------------------------------------


class CountingTransport(httpx.HTTPTransport):
    """The network transport, remembering the query of every request sent through it."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(dict(request.url.params))
        return super().handle_request(request)


@pytest.fixture
def served_api(migrated_url: str, live_server: LiveServer) -> Iterator[tuple[Api, str]]:
    """`api` on the database a live server on loopback serves too."""
    with api_client(migrated_url) as api:
        app = create_app(Settings(database_url=migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            yield api, base_url


def test_the_client_reads_every_page(served_api: tuple[Api, str]) -> None:
    api, url = served_api
    names = [api.device_name, *add_devices(api, [f"edge-{i}" for i in range(4)])]
    versions = add_predictors(api, 5)
    plans = add_plans(api, 3)
    fits = add_jobs(api, 2, status=JobStatus.FAILED)
    transport = CountingTransport()
    with Client(url, api.keys.reader, transport=transport) as client:
        assert [device.name for device in client.devices(limit=2)] == sorted(names)
        assert [query.get("limit") for query in transport.queries] == ["2", "2", "2"]
        assert "cursor" not in transport.queries[0] and all("cursor" in q for q in transport.queries[1:])
        assert [p.version for p in client.predictors("tiny-cpu", limit=2)] == sorted(versions, reverse=True)
        assert [job.id for job in client.jobs(limit=2)] == sorted(plans + fits, reverse=True)
        assert [job.id for job in client.jobs(status="failed", limit=1)] == sorted(fits, reverse=True)
        assert [plan.id for plan in client.plans(device="tiny-cpu", limit=2)] == sorted(plans, reverse=True)
        assert client.plans(status="succeeded") == []
        transport.queries.clear()
        assert [device.name for device in client.devices()] == sorted(names)
        assert transport.queries == [{}]


def test_device_list_on_a_server_prints_every_page(
    served_api: tuple[Api, str],
    migrated_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, url = served_api
    names = add_devices(api, [f"node-{i:03d}" for i in range(105)])
    monkeypatch.setenv("LPNET_DATABASE_URL", migrated_url)
    code, local, err = run_cli(capsys, "device", "list")
    assert code == 0, err
    code, remote, err = run_cli(capsys, "device", "list", "--server", url, "--key", api.keys.reader)
    assert code == 0, err
    assert remote == local
    printed = [line.split()[0] for line in remote.splitlines()[1:] if line.strip()]
    assert sorted(set(printed) & set(names + [api.device_name])) == sorted(names + [api.device_name])


def test_a_device_is_listed_once_however_the_pages_fall(api: Api) -> None:
    add_devices(api, [f"d-{i:02d}" for i in range(10)])
    with api.factory() as session:
        names = sorted(session.scalars(select(Device.name)))
    for limit in (1, 2, 4, 11, 12):
        assert [n for page in walk(api, LISTINGS["devices"], limit=limit) for n in page] == names
