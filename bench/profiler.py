"""Benchmark of the profiler itself: reproducibility across processes, throughput and additivity.

A fixed reference set (unpruned and width-pruned networks, in-context per-layer runs and isolated
layers of a few torchvision families, deterministic from a seed) is measured in separate fresh
processes. Reported:

- reproducibility: per configuration, (max - min) / mean of the medians from the processes; the
  median of that over the set is the figure to hold under 2 % at one thread;
- throughput: measurements per minute per kind;
- additivity: in-context per-layer sum / whole-network median, per family.

Two schedules:
  interleaved (default): the processes stay alive and take turns, configuration by configuration
      (A B, then B A, ...), so both see the same background load and what differs is the process;
  sequential: each process runs the whole set through `run_profile` and a JSONL sink, one process
      after the other, as two separate profiling runs would.

Usage:
    python bench/profiler.py              # four families, ~5-8 minutes on 2 quiet cores
    python bench/profiler.py --quick      # two families, fewer samples, ~2 minutes
The JSON goes to bench/results/profiler.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from profiler.batch import Measurement, RunContext
    from profiler.sampling import Sample

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "profiler.json"
DEFAULT_FAMILIES = ("resnet18", "mobilenet_v2", "resnet50", "mobilenet_v3_large")
QUICK_FAMILIES = ("resnet18", "mobilenet_v2")
TARGET_REL_DIFF = 0.02
SEED = 2024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two families, fewer samples")
    parser.add_argument("--families", help="comma-separated torchvision names (overrides the default set)")
    parser.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes to compare (>= 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="torch-cpu")
    parser.add_argument(
        "--pruned", type=int, help="width-pruned variants per family (besides the unpruned net)"
    )
    parser.add_argument("--isolated", type=int, help="isolated layer configs per family")
    parser.add_argument("--in-context", type=int, help="in-context per-layer runs per family")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--retain-memory", action="store_true", help="mallopt: keep freed memory in-process")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    # Internal: how the parent starts its workers.
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # sequential: write rows here
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # interleaved: stdin/stdout
    args = parser.parse_args(argv)
    families = (
        args.families.split(",") if args.families else (QUICK_FAMILIES if args.quick else DEFAULT_FAMILIES)
    )
    args.families = [f.strip() for f in families if f.strip()]
    if args.pruned is None:
        args.pruned = 1 if args.quick else 3
    if args.isolated is None:
        args.isolated = 4 if args.quick else 8
    if args.in_context is None:
        args.in_context = 1
    if args.processes < 2 and args.worker is None and not args.serve:
        parser.error("--processes must be at least 2 to compare processes")
    return args


def worker_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--families",
        ",".join(args.families),
        "--threads",
        str(args.threads),
        "--backend",
        args.backend,
        "--pruned",
        str(args.pruned),
        "--isolated",
        str(args.isolated),
        "--in-context",
        str(args.in_context),
        "--image-size",
        str(args.image_size),
    ]
    if args.retain_memory:
        command.append("--retain-memory")
    return command


# Worker side ------------------------------------------------------------------------------------------


@dataclass
class WorkerSetup:
    context: RunContext
    samples: list[Sample]
    backend: Any


def setup_worker(args: argparse.Namespace) -> WorkerSetup:
    """The reference set, in the same order in every process."""
    from profiler.device import local_device_spec
    from profiler.environment import retain_freed_memory
    from profiler.protocol import TimingProtocol
    from profiler.runner import make_run_context
    from profiler.sampling import SamplingConfig, StratifiedSampler

    if args.retain_memory:
        retain_freed_memory()
    device = local_device_spec(backend=args.backend, threads=args.threads)
    backend = device.create_backend()
    config = SamplingConfig(
        network_samples=1 + args.pruned,
        in_context_samples=args.in_context,
        isolated_samples=args.isolated,
        uniform_points=1,  # the unpruned net, one uniform point at 0.1, then Latin-hypercube points
        seed=SEED,
    )
    sampler = StratifiedSampler.for_families(
        args.families, device, config, input_shape=(1, 3, args.image_size, args.image_size)
    )
    samples: list[Sample] = []
    while batch := sampler.next_batch(set(), size=1):
        samples.extend(batch)
    if not backend.supports_layerwise:
        samples = [s for s in samples if s.kind.value != "in_context"]
    return WorkerSetup(make_run_context(device, TimingProtocol(), backend), samples, backend)


def serve(args: argparse.Namespace) -> None:
    """Interleaved worker: announce the set, then measure the sample whose index arrives on stdin."""
    from profiler.measure import measure_sample

    # stdout carries the protocol only: anything a library prints goes to stderr instead.
    out: TextIO = sys.stdout
    sys.stdout = sys.stderr
    setup = setup_worker(args)
    out.write(
        json.dumps({"ready": len(setup.samples), "context": setup.context.model_dump(mode="json")}) + "\n"
    )
    out.flush()
    for line in sys.stdin:
        sample = setup.samples[int(line)]
        row = measure_sample(sample, setup.backend, setup.context.protocol, setup.context.device.batch_size)
        out.write(json.dumps({"row": row.model_dump(mode="json")}) + "\n")
        out.flush()


def run_sequential_worker(args: argparse.Namespace) -> None:
    """Sequential worker: the whole set through `run_profile` into the JSONL file `args.worker`."""
    from profiler.runner import run_profile
    from profiler.sampling import ListSampler
    from profiler.sinks import JsonlSink

    setup = setup_worker(args)
    sink = JsonlSink(args.worker, setup.context)
    try:
        run_profile(
            setup.context.device,
            ListSampler(setup.samples),
            sink,
            setup.context.protocol,
            progress=False,
            backend=setup.backend,
        )
    finally:
        sink.close()


# Parent side ------------------------------------------------------------------------------------------


@dataclass
class ProcessRun:
    context: RunContext
    rows: dict[str, Measurement]
    wall_seconds: float


def run_interleaved(args: argparse.Namespace) -> list[ProcessRun]:
    from profiler.batch import Measurement, RunContext

    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [*worker_command(args), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(args.processes)
    ]
    try:
        hellos = [json.loads(_read_line(w)) for w in workers]
        counts = {h["ready"] for h in hellos}
        if len(counts) != 1:
            raise RuntimeError(f"workers disagree on the reference set size: {sorted(counts)}")
        total = counts.pop()
        runs = [ProcessRun(RunContext.model_validate(h["context"]), {}, 0.0) for h in hellos]
        print(f"{args.processes} processes take turns over {total} configurations", flush=True)
        for index in range(total):
            # Alternate who goes first, so neither process always follows the other's forward.
            order = list(range(len(workers))) if index % 2 == 0 else list(reversed(range(len(workers))))
            medians: dict[int, float | None] = {}
            for w in order:
                stdin = workers[w].stdin
                assert stdin is not None  # opened with stdin=PIPE
                stdin.write(f"{index}\n")
                stdin.flush()
                row = Measurement.model_validate(json.loads(_read_line(workers[w]))["row"])
                runs[w].rows[row.sample_key] = row
                medians[w] = row.median_ms
            shown = " ".join(
                f"{medians[w]:.3f}" if medians[w] is not None else "failed" for w in sorted(medians)
            )
            print(
                f"[{index + 1}/{total}] {row.kind.value:<10} {row.family or '-':<18} {shown} ms", flush=True
            )
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in workers:
            worker.wait(timeout=60)
    elapsed = time.perf_counter() - start
    for run in runs:
        run.wall_seconds = elapsed
    return runs


def _read_line(worker: subprocess.Popen[str]) -> str:
    assert worker.stdout is not None
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker exited with code {worker.wait()}; see its messages above")
    return line


def run_sequential(args: argparse.Namespace, workdir: Path) -> list[ProcessRun]:
    from profiler.sinks import read_jsonl

    runs = []
    for index in range(args.processes):
        out = workdir / f"process{index}.jsonl"
        print(f"process {index + 1}/{args.processes}: measuring {', '.join(args.families)} ...", flush=True)
        start = time.perf_counter()
        subprocess.run([*worker_command(args), "--worker", str(out)], check=True, cwd=ROOT)
        contexts, rows = read_jsonl(out)
        runs.append(ProcessRun(contexts[0], {r.sample_key: r for r in rows}, time.perf_counter() - start))
    return runs


def spread(values: list[float]) -> float:
    """Spread of medians from different processes: (max - min) / mean."""
    return (max(values) - min(values)) / statistics.fmean(values)


def analyse(args: argparse.Namespace, runs: list[ProcessRun]) -> dict[str, Any]:
    per_sample: list[dict[str, Any]] = []
    for key, first in runs[0].rows.items():
        rows = [run.rows.get(key) for run in runs]
        medians = [
            r.median_ms for r in rows if r is not None and r.status == "ok" and r.median_ms is not None
        ]
        if len(medians) != len(runs):
            continue
        per_sample.append(
            {
                "sample_key": key,
                "kind": first.kind.value,
                "family": first.family,
                "what": first.layer.op.value if first.layer is not None else _width_label(first.width_vector),
                "medians_ms": medians,
                "rel_diff": spread(medians),
                "cv": [r.cv for r in rows if r is not None],
            }
        )

    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({s["kind"] for s in per_sample}):
        diffs: list[float] = [s["rel_diff"] for s in per_sample if s["kind"] == kind]
        by_kind[kind] = {
            "count": len(diffs),
            "median_rel_diff": statistics.median(diffs),
            "max_rel_diff": max(diffs),
            "within_2pct": sum(d <= TARGET_REL_DIFF for d in diffs) / len(diffs),
        }
    all_diffs: list[float] = [s["rel_diff"] for s in per_sample]
    networks: list[float] = [s["rel_diff"] for s in per_sample if s["kind"] in ("network", "in_context")]

    durations: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for run in runs:
        for row in run.rows.values():
            durations.setdefault(row.kind.value, []).append(row.duration_s)
            if row.kind.value == "in_context" and row.status == "ok" and row.layers_sum_ms and row.median_ms:
                ratios.setdefault(row.family or "-", []).append(row.layers_sum_ms / row.median_ms)
    # Time inside measure_sample (build, prepare, warm-up, timing); tracing a family once is not included.
    throughput = {kind: 60.0 / statistics.fmean(values) for kind, values in sorted(durations.items())}
    additivity = {
        family: {"sum_over_network": statistics.fmean(values), "runs": len(values)}
        for family, values in ratios.items()
    }
    failures = [
        {"sample_key": r.sample_key, "kind": r.kind.value, "family": r.family, "error": r.error}
        for run in runs
        for r in run.rows.values()
        if r.status != "ok"
    ]
    context = runs[0].context
    loads = [_mean_load(run.rows.values()) for run in runs]
    # One core per thread measures; more load than the remaining cores means others competed for the CPU.
    spare = context.environment.logical_cores - args.threads
    return {
        "config": {
            "schedule": args.schedule,
            "families": args.families,
            "processes": args.processes,
            "threads": args.threads,
            "backend": args.backend,
            "pruned_per_family": args.pruned,
            "isolated_per_family": args.isolated,
            "in_context_per_family": args.in_context,
            "image_size": args.image_size,
            "retain_memory": args.retain_memory,
            "quick": args.quick,
            "seed": SEED,
        },
        "device": context.device.to_dict(),
        "environment": context.environment.model_dump(mode="json"),
        "protocol": context.protocol.model_dump(mode="json"),
        "reproducibility": {
            "target_median_rel_diff": TARGET_REL_DIFF,
            "median_rel_diff_all": statistics.median(all_diffs) if all_diffs else None,
            "median_rel_diff_networks": statistics.median(networks) if networks else None,
            "target_met": bool(all_diffs) and statistics.median(all_diffs) <= TARGET_REL_DIFF,
            "by_kind": by_kind,
            "per_sample": per_sample,
        },
        "throughput_per_minute": throughput,
        "additivity": additivity,
        "processes": [
            {"wall_seconds": run.wall_seconds, "mean_load_1m": load, "rows": len(run.rows)}
            for run, load in zip(runs, loads, strict=True)
        ],
        "machine_busy": any(load is not None and load > spare + 0.5 for load in loads),
        "failures": failures,
    }


def _mean_load(rows: Any) -> float | None:
    loads = [r.load_average_1m for r in rows if r.load_average_1m is not None]
    return statistics.fmean(loads) if loads else None


def _width_label(widths: list[int] | None) -> str:
    return f"{len(widths)} groups, sum {sum(widths)}" if widths else "-"


def print_report(report: dict[str, Any]) -> None:
    repro = report["reproducibility"]
    processes = report["config"]["processes"]
    print()
    header = " ".join(f"{'p' + str(i + 1) + ' ms':>9}" for i in range(processes))
    print(f"{'kind':<11} {'family':<19} {'what':<24} {header} {'diff':>7}")
    for s in repro["per_sample"]:
        medians = " ".join(f"{m:>9.3f}" for m in s["medians_ms"])
        print(
            f"{s['kind']:<11} {s['family'] or '-':<19} {s['what'][:24]:<24} {medians} {s['rel_diff']:>7.2%}"
        )
    print()
    print(f"{'kind':<11} {'count':>5} {'median diff':>12} {'max diff':>9} {'<=2%':>6} {'per min':>8}")
    for kind, stats in repro["by_kind"].items():
        rate = report["throughput_per_minute"].get(kind, 0.0)
        print(
            f"{kind:<11} {stats['count']:>5} {stats['median_rel_diff']:>12.2%} {stats['max_rel_diff']:>9.2%} "
            f"{stats['within_2pct']:>6.0%} {rate:>8.1f}"
        )
    overall = repro["median_rel_diff_all"]
    if overall is not None:
        verdict = "met" if repro["target_met"] else "NOT met"
        print(f"median relative difference between processes: {overall:.2%} (target <= 2 %: {verdict})")
    for family, add in report["additivity"].items():
        print(f"additivity {family}: in-context layer sum / network = {add['sum_over_network']:.3f}")
    if report["failures"]:
        print(f"{len(report['failures'])} failed measurement(s); see the JSON")
    loads = ", ".join(
        f"{p['mean_load_1m']:.2f}" for p in report["processes"] if p["mean_load_1m"] is not None
    )
    print(f"schedule: {report['config']['schedule']}; mean 1-min load per process: {loads}")
    if report["machine_busy"]:
        print("WARNING: other processes competed for the CPU during the run; differences include their noise")
    env = report["environment"]
    print(
        f"environment: {env['cpu_model']}, {env['logical_cores']} logical cores, torch "
        f"{env['packages'].get('torch')}, load at start {env['load_average']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.serve:
        serve(args)
        return 0
    if args.worker is not None:
        run_sequential_worker(args)
        return 0
    start = time.perf_counter()
    if args.schedule == "interleaved":
        runs = run_interleaved(args)
    else:
        with tempfile.TemporaryDirectory(prefix="lpnet-bench-") as workdir:
            runs = run_sequential(args, Path(workdir))
    report = analyse(args, runs)
    report["total_seconds"] = time.perf_counter() - start
    report["cpu_count"] = os.cpu_count()
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"saved {args.output} ({report['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
