"""The profiling flags that `python -m profiler.agent.standalone` and `lpnet profile` share.

Both commands measure a machine with the same options (`profiler.agent.options.options_from_args`
reads them); they differ only in where measurements go. Importing this module loads no torch, so a
command line can be built before anything heavy is imported.
"""

from __future__ import annotations

import argparse

from profiler.batch import MeasurementKind
from profiler.environment import DEFAULT_SECONDS_PER_PROCESS, AllocatorPolicy
from profiler.family_names import describe_special_families


def positive_float(text: str) -> float:
    """argparse type for a positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for a count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type for a number of 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def add_sampling_arguments(parser: argparse._ActionsContainer) -> None:
    """What is measured and for how long: families, kinds, counts, image size, seed, protocol."""
    parser.add_argument("--budget-minutes", type=positive_float, help="stop after this much measuring time")
    parser.add_argument(
        "--families",
        help=f"comma-separated torchvision names, {describe_special_families(last='or')} (default: ten "
        "common torchvision models)",
    )
    parser.add_argument(
        "--kinds",
        help=f"comma-separated kinds to measure (default: {','.join(k.value for k in MeasurementKind)})",
    )
    parser.add_argument("--network-samples", type=non_negative_int, help="width vectors per family")
    parser.add_argument("--in-context-samples", type=non_negative_int, help="in-context networks per family")
    parser.add_argument("--isolated-samples", type=non_negative_int, help="isolated layers per family")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a loose timing protocol, for smoke runs only")
    parser.add_argument(
        "--seconds-per-process",
        type=non_negative_float,
        default=DEFAULT_SECONDS_PER_PROCESS,
        help="measure in child processes, each replaced after this many seconds, so that every timing "
        "comes from a young process as a label's or a deployment's does; 0 measures in this process "
        f"(default: {DEFAULT_SECONDS_PER_PROCESS:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device_arguments(parser: argparse._ActionsContainer, allocator_help: str) -> None:
    """The runtime measured: backend, threads, batch size, dtype, hardware name, allocator policy."""
    parser.add_argument("--backend", default="torch-cpu", help="backend measured with (default: torch-cpu)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--dtype", default="float32", help="dtype (default: float32)")
    parser.add_argument("--hardware", help="hardware name to record (default: this CPU's model)")
    parser.add_argument(
        "--allocator", choices=[policy.value for policy in AllocatorPolicy], help=allocator_help
    )
