"""`lpnet fit`: fit a device's predictor on its measurements and store it as the next version."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.commands._common import database_session, info, print_table
from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add the ``fit`` command."""
    parser = subparsers.add_parser(
        "fit",
        help="fit a device's latency predictor",
        description=(
            "Fit LPNet on the device's measured networks, store it as the device's next predictor "
            "version and print its accuracy."
        ),
    )
    parser.add_argument("--device", required=True, help="device name")
    parser.add_argument("--plot", type=Path, help="also save the predicted-vs-measured PNG here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_fit)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as (dotted name, value) rows, floats rounded for people."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten_metrics(value, f"{name}."))
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        elif isinstance(value, list):
            rows.append((name, f"[{len(value)} values]"))
        else:
            rows.append((name, value))
    return rows


def run_fit(args: argparse.Namespace, settings: Settings) -> int:
    """Fit in this process, store the predictor, print its metrics."""
    from tqdm import tqdm

    from profiler.speed import steadiness_warning
    from service.db.session import make_engine, make_session_factory
    from service.devices import get_device, set_device_status
    from service.predictors import (
        check_enough_measurements,
        fit_from_samples,
        store_predictor,
    )
    from service.training_set import training_samples

    with database_session(settings) as session:
        device = get_device(session, args.device)
        device_id, name = device.id, device.name
        check_enough_measurements(session, device)
        samples = training_samples(session, device_id)
    info(
        f"fitting {name!r} on {len(samples.samples)} measured networks "
        f"({samples.timings} timings, {samples.labels} labels)"
    )
    unsteady = steadiness_warning(samples.typical_slowdown, samples.speed_shift)
    if unsteady is not None:
        info(f"warning: {unsteady}")
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    bar = tqdm(total=100, unit="%", disable=args.no_progress, dynamic_ncols=True)
    last_status = 0.0

    def progress(step: int, total: int) -> None:
        nonlocal last_status
        percent = 100.0 * step / total if total else 0.0
        bar.update(max(0.0, percent - bar.n))
        if time.monotonic() - last_status > 2.0:
            last_status = time.monotonic()
            set_device_status(factory, device_id, "fitting", percent=percent, message="lpnet fit")

    try:
        set_device_status(factory, device_id, "fitting", percent=0.0, message="lpnet fit")
        try:
            fitted = fit_from_samples(samples, progress, settings.fit)
        except BaseException:
            set_device_status(factory, device_id, None)
            raise
        finally:
            bar.close()
        with factory() as session:
            predictor = store_predictor(session, device_id, fitted)
            session.commit()
            predictor_id, version = predictor.id, predictor.version
    finally:
        engine.dispose()
    if args.plot and fitted.plot_png:
        args.plot.write_bytes(fitted.plot_png)
        info(f"plot saved to {args.plot}")
    print(
        f"device {name!r}: predictor version {version} (id {predictor_id}), {fitted.samples} networks, "
        f"{fitted.seconds:.1f} s"
    )
    print_table(("METRIC", "VALUE"), flatten_metrics(fitted.metrics))
    return 0
