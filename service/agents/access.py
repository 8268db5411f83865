"""Which API key may act for which device and agent task: an agent key for its own device only, an
admin key for any device it names."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.db.models import AgentTask, ApiKey, Device, KeyScope
from service.devices import resolve_device
from service.errors import InvalidInput, NotFound, PermissionDenied


def get_task(session: Session, task_id: int) -> AgentTask:
    """Return agent task `task_id`.

    Raises:
        NotFound: No such task.
    """
    task = session.get(AgentTask, task_id)
    if task is None:
        raise NotFound(f"no agent task with id {task_id}", {"task_id": task_id})
    return task


def device_for_key(session: Session, key: ApiKey, ref: int | str | None) -> Device:
    """The device an agent request is for: an agent key's own, or the one an admin key names.

    Raises:
        InvalidInput: An admin key without a device.
        NotFound: Unknown device.
        PermissionDenied: An agent key naming another device.
    """
    if key.scope == KeyScope.AGENT:
        device = session.get(Device, key.device_id)
        if device is None:  # the key's device cascade-deletes its keys; a cached key may outlive it
            raise NotFound(f"the device of API key {key.prefix} no longer exists")
        if ref is not None:
            _require_own_device(key, resolve_device(session, ref))
        return device
    if ref is None:
        raise InvalidInput(
            "an admin key may act for any device: name the device in `device` (or use the device's agent key)"
        )
    return resolve_device(session, ref)


def task_for_key(session: Session, key: ApiKey, task_id: int) -> AgentTask:
    """Task `task_id`, if the key may work on it (admin keys, or the agent key of its device).

    Raises:
        NotFound: No such task.
        PermissionDenied: The agent key of another device.
    """
    task = get_task(session, task_id)
    _require_own_device(key, task.device)
    return task


def _require_own_device(key: ApiKey, device: Device) -> None:
    if key.scope == KeyScope.AGENT and key.device_id != device.id:
        raise PermissionDenied(
            f"API key {key.prefix} is the agent key of another device; it may only work for its own device, "
            f"not {device.name!r}",
            {"device": device.name},
        )
