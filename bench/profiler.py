"""Benchmark of the profiler itself: reproducibility across processes, throughput and additivity.

The same fixed reference set (unpruned and width-pruned networks, in-context per-layer runs and
isolated layers of a few torchvision families) is measured in separate fresh processes, one after
the other. Reported:

- reproducibility: per configuration, |a - b| / mean(a, b) of the medians from two processes;
  the median of that over the set is the figure to hold under 2 % at one thread;
- throughput: measurements per minute per kind;
- additivity: in-context per-layer sum / whole-network median, per family.

Usage:
    python bench/profiler.py              # default set, ~5-8 minutes on 2 cores
    python bench/profiler.py --quick      # two families, fewer samples, ~2 minutes
The JSON goes to bench/results/profiler.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "profiler.json"
DEFAULT_FAMILIES = ("resnet18", "mobilenet_v2", "resnet50", "mobilenet_v3_large")
QUICK_FAMILIES = ("resnet18", "mobilenet_v2")
TARGET_REL_DIFF = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two families, fewer samples")
    parser.add_argument("--families", help="comma-separated torchvision names (overrides the default set)")
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
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: write rows here
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
    if args.processes < 2 and args.worker is None:
        parser.error("--processes must be at least 2 to compare processes")
    return args


# Worker -----------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> None:
    """Measure the reference set in this process; rows go to `args.worker` (JSONL), summary beside it."""
    from profiler.device import local_device_spec
    from profiler.environment import retain_freed_memory
    from profiler.protocol import TimingProtocol
    from profiler.runner import make_run_context, run_profile
    from profiler.sampling import SamplingConfig, StratifiedSampler
    from profiler.sinks import JsonlSink

    if args.retain_memory:
        retain_freed_memory()
    device = local_device_spec(backend=args.backend, threads=args.threads)
    protocol = TimingProtocol()
    backend = device.create_backend()
    config = SamplingConfig(
        network_samples=1 + args.pruned,
        in_context_samples=args.in_context,
        isolated_samples=args.isolated,
        uniform_points=1,  # the unpruned net, one uniform point at 0.1, then Latin-hypercube points
        seed=2024,
    )
    sampler = StratifiedSampler.for_families(
        args.families, device, config, input_shape=(1, 3, args.image_size, args.image_size)
    )
    sink = JsonlSink(args.worker, make_run_context(device, protocol, backend))
    try:
        summary = run_profile(device, sampler, sink, protocol, progress=False, backend=backend)
    finally:
        sink.close()
    args.worker.with_suffix(".summary.json").write_text(json.dumps(summary.to_dict()))


# Parent -----------------------------------------------------------------------------------------------


def spawn_workers(args: argparse.Namespace, workdir: Path) -> list[tuple[Path, float]]:
    outputs = []
    for index in range(args.processes):
        out = workdir / f"process{index}.jsonl"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(out),
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
        print(f"process {index + 1}/{args.processes}: measuring {', '.join(args.families)} ...", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        outputs.append((out, time.perf_counter() - start))
    return outputs


def relative_difference(values: list[float]) -> float:
    """Spread of medians from different processes: (max - min) / mean."""
    return (max(values) - min(values)) / statistics.fmean(values)


def analyse(args: argparse.Namespace, outputs: list[tuple[Path, float]]) -> dict[str, Any]:
    from profiler.sinks import read_jsonl

    runs = []
    for path, seconds in outputs:
        contexts, rows = read_jsonl(path)
        summary = json.loads(path.with_suffix(".summary.json").read_text())
        runs.append(
            {
                "context": contexts[0],
                "rows": {r.sample_key: r for r in rows},
                "summary": summary,
                "wall_seconds": seconds,
            }
        )

    per_sample = []
    for key, first in runs[0]["rows"].items():
        medians = [run["rows"][key].median_ms for run in runs if key in run["rows"]]
        if first.status != "ok" or len(medians) != len(runs) or any(m is None for m in medians):
            continue
        per_sample.append(
            {
                "sample_key": key,
                "kind": first.kind.value,
                "family": first.family,
                "what": first.layer.op.value if first.layer is not None else _width_label(first.width_vector),
                "medians_ms": medians,
                "rel_diff": relative_difference(medians),
                "cv": [run["rows"][key].cv for run in runs],
            }
        )

    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({s["kind"] for s in per_sample}):
        diffs = [s["rel_diff"] for s in per_sample if s["kind"] == kind]
        by_kind[kind] = {
            "count": len(diffs),
            "median_rel_diff": statistics.median(diffs),
            "max_rel_diff": max(diffs),
            "within_2pct": sum(d <= TARGET_REL_DIFF for d in diffs) / len(diffs),
        }
    whole = [s["rel_diff"] for s in per_sample if s["kind"] in ("network", "in_context")]
    all_diffs = [s["rel_diff"] for s in per_sample]

    throughput: dict[str, float] = {}
    for kind in sorted({k for run in runs for k in run["summary"]["per_kind"]}):
        rates = [
            run["summary"]["per_kind"][kind]["per_minute"]
            for run in runs
            if kind in run["summary"]["per_kind"]
        ]
        throughput[kind] = statistics.fmean(rates)

    ratios: dict[str, list[float]] = {}
    for run in runs:
        for row in run["rows"].values():
            if row.kind.value == "in_context" and row.status == "ok":
                ratios.setdefault(row.family or "-", []).append(row.layers_sum_ms / row.median_ms)
    additivity_summary = {
        family: {"sum_over_network": statistics.fmean(values), "runs": len(values)}
        for family, values in ratios.items()
    }

    failures = [
        {"sample_key": r.sample_key, "kind": r.kind.value, "family": r.family, "error": r.error}
        for run in runs
        for r in run["rows"].values()
        if r.status != "ok"
    ]
    first_context = runs[0]["context"]
    return {
        "config": {
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
        },
        "device": first_context.device.to_dict(),
        "environment": first_context.environment.model_dump(mode="json"),
        "protocol": first_context.protocol.model_dump(mode="json"),
        "reproducibility": {
            "target_median_rel_diff": TARGET_REL_DIFF,
            "median_rel_diff_all": statistics.median(all_diffs) if all_diffs else None,
            "median_rel_diff_networks": statistics.median(whole) if whole else None,
            "target_met": bool(all_diffs) and statistics.median(all_diffs) <= TARGET_REL_DIFF,
            "by_kind": by_kind,
            "per_sample": per_sample,
        },
        "throughput_per_minute": throughput,
        "additivity": additivity_summary,
        "processes": [{"wall_seconds": run["wall_seconds"], "summary": run["summary"]} for run in runs],
        "failures": failures,
    }


def _width_label(widths: list[int] | None) -> str:
    if not widths:
        return "-"
    return f"{len(widths)} groups, sum {sum(widths)}"


def print_report(report: dict[str, Any]) -> None:
    repro = report["reproducibility"]
    print()
    print(
        f"{'kind':<11} {'family':<19} {'what':<24} "
        + " ".join(f"{'p' + str(i + 1) + ' ms':>9}" for i in range(report["config"]["processes"]))
        + f" {'diff':>7}"
    )
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
    env = report["environment"]
    print(
        f"environment: {env['cpu_model']}, {env['logical_cores']} logical cores, torch "
        f"{env['packages'].get('torch')}, load {env['load_average']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker is not None:
        run_worker(args)
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lpnet-bench-") as workdir:
        outputs = spawn_workers(args, Path(workdir))
        report = analyse(args, outputs)
    report["total_seconds"] = time.perf_counter() - start
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"saved {args.output} ({report['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
