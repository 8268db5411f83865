"""`lpnet device`: register and list devices."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pydantic import ValidationError

from lpnet.errors import LpnetError
from profiler.environment import AllocatorPolicy
from service.commands._common import (
    CommandError,
    database_session,
    describe_validation_error,
    info,
    print_table,
)
from service.commands.remote import remote_client, server_arguments
from service.config import Settings
from service.devices import create_device, describe_devices, list_devices, local_device
from service.schemas.devices import DeviceCreate, DeviceRead, DeviceStatus

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add the ``device`` command group."""
    parser = subparsers.add_parser(
        "device", help="register and list devices", description="Register and list devices."
    )
    actions = parser.add_subparsers(dest="device_action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="register a device",
        description=(
            "Register a device. By default it is this machine, and its CPU model and software "
            "versions are recorded; with --remote it is measured elsewhere by an agent."
        ),
    )
    add.add_argument("name", help="unique name, e.g. laptop-1t or pi4")
    add.add_argument("--backend", default="torch-cpu", help="measurement backend (default: torch-cpu)")
    add.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    add.add_argument("--batch-size", type=int, default=1, help="batch size measured (default: 1)")
    add.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    add.add_argument("--hardware", help="hardware description (default for a local device: its CPU model)")
    add.add_argument(
        "--allocator",
        choices=[policy.value for policy in AllocatorPolicy],
        default=AllocatorPolicy.RETAIN.value,
        help="allocator policy its latencies hold under: retain (freed memory kept by the process, faster "
        "and more repeatable) or system (the C library's default) (default: retain)",
    )
    add.add_argument(
        "--remote", action="store_true", help="the device is measured by an agent, not on this machine"
    )
    add.set_defaults(handler=run_add)

    listing = actions.add_parser("list", help="list devices")
    server_arguments(listing)
    listing.set_defaults(handler=run_list)


def run_add(args: argparse.Namespace, settings: Settings) -> int:
    """Register a device."""
    try:
        if args.remote:
            if not args.hardware:
                raise CommandError(
                    "a remote device needs --hardware (e.g. --hardware 'Raspberry Pi 4 Cortex-A72')", 2
                )
            spec = DeviceCreate(
                name=args.name,
                hardware=args.hardware,
                backend=args.backend,
                threads=args.threads,
                batch_size=args.batch_size,
                dtype=args.dtype,
                allocator=AllocatorPolicy(args.allocator),
                is_local=False,
            )
        else:
            spec = local_device(
                args.name,
                backend=args.backend,
                threads=args.threads,
                batch_size=args.batch_size,
                dtype=args.dtype,
                allocator=AllocatorPolicy(args.allocator),
            )
            if args.hardware:
                spec = DeviceCreate.model_validate({**spec.model_dump(), "hardware": args.hardware})
    except ValidationError as exc:
        raise CommandError(describe_validation_error("device", exc), 2) from exc
    except LpnetError as exc:
        # The profiler's InvalidDeviceSpec: an unknown backend or dtype, too many threads, ...
        raise CommandError(f"invalid device: {exc.message}", 2) from exc
    with database_session(settings) as session:
        device = create_device(session, spec)
        summary = (
            f"added device {device.name!r}: {device.hardware}, {device.backend}, "
            f"{device.threads} thread(s), batch {device.batch_size}, {device.dtype}, "
            f"allocator {device.allocator}{'' if device.is_local else ', remote'}"
        )
    print(summary)
    return 0


def _status_text(status: DeviceStatus) -> str:
    parts: list[str] = [status.phase]
    if status.percent is not None and status.phase in ("profiling", "fitting", "refining"):
        parts.append(f"{status.percent:.0f}%")
    if status.eta_seconds is not None:
        parts.append(f"eta {status.eta_seconds:.0f} s")
    if status.phase == "ready" and status.refined:
        parts.append("refined")
    return " ".join(parts)


def _devices(args: argparse.Namespace, settings: Settings) -> list[DeviceRead]:
    """The devices of the local database or, with ``--server``, of that server."""
    if args.server:
        with remote_client(args) as client:
            return [DeviceRead.model_validate(device.model_dump(mode="json")) for device in client.devices()]
    with database_session(settings) as session:
        return describe_devices(session, list_devices(session))


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print the devices with their status, measurements and predictor version."""
    rows = [
        (
            device.name,
            device.backend,
            device.threads,
            device.batch_size,
            device.dtype,
            "local" if device.is_local else "remote",
            device.allocator.value,
            device.hardware,
            device.profiling.network.ok,
            device.predictor.version if device.predictor is not None else None,
            _status_text(device.status),
        )
        for device in _devices(args, settings)
    ]
    if not rows:
        info("no devices; add one with `lpnet device add NAME`")
        return 0
    print_table(
        (
            "NAME",
            "BACKEND",
            "THREADS",
            "BATCH",
            "DTYPE",
            "WHERE",
            "ALLOCATOR",
            "HARDWARE",
            "NETWORKS",
            "PREDICTOR",
            "STATUS",
        ),
        rows,
    )
    return 0
