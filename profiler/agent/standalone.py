"""A standalone device agent: profile this machine and send the measurements somewhere.

Runs on the device being profiled, with nothing of the service installed:

    python -m profiler.agent.standalone --families resnet18,mobilenet_v2 --budget-minutes 30 --jsonl runs/cpu.jsonl
    LPNET_API_KEY=... python -m profiler.agent.standalone --url http://server:8000 --device-id 3 --budget-minutes 60

The service's `lpnet profile` command builds the same pieces (`profiler.agent.options`) with a
database sink instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lpnet.errors import LpnetError
from profiler.agent.flags import add_device_arguments, add_sampling_arguments
from profiler.agent.options import options_from_args, run_agent
from profiler.environment import apply_allocator_policy
from profiler.runner import make_run_context
from profiler.sinks import HttpSink, JsonlSink, MeasurementSink

API_KEY_ENV = "LPNET_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m profiler.agent.standalone", description=__doc__.split("\n\n")[0]
    )
    add_sampling_arguments(parser)
    add_device_arguments(
        parser, "allocator policy to measure under; with --url, the service device's (default: retain)"
    )
    target = parser.add_argument_group("where measurements go (one of)")
    target.add_argument("--jsonl", type=Path, help="append to this JSONL file")
    target.add_argument("--url", help="service base URL; the API key comes from $" + API_KEY_ENV)
    parser.add_argument("--device-id", help="the service's device id (with --url)")
    parser.add_argument("--spool-dir", type=Path, default=Path(".lpnet-spool"), help="undelivered batches")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.jsonl is None) == (args.url is None):
        parser.error("give exactly one of --jsonl or --url")
    try:
        options = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        apply_allocator_policy(options.allocator)  # before the run's context is fingerprinted
        device = options.device()
        backend = device.create_backend()
        context = make_run_context(device, options.protocol(), backend)
        sink: MeasurementSink
        if args.url:
            api_key = os.environ.get(API_KEY_ENV)
            if not api_key or not args.device_id:
                parser.error(f"--url needs --device-id and the API key in ${API_KEY_ENV}")
            sink = HttpSink(args.url, args.device_id, api_key, context, args.spool_dir)
        else:
            sink = JsonlSink(args.jsonl, context)
        try:
            summary = run_agent(options, sink)
        finally:
            sink.close()
    except LpnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary.print_table()
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
