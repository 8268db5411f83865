"""Plan quality: do architecture-only plans measure at or under their latency budget?

For resnet18, resnet50 and mobilenet_v2 (torch on the CPU, 1 thread), budgets of 0.5 / 0.7 / 0.9 of the
unpruned network's *measured* latency are planned twice: once without measurement (the predictor
alone) and once with the verification loop (measure, re-plan; at most `--max-rounds`, default 5). Every plan is then
measured again, in the same process, as a separate timing (the figure judged). Reported: the share of plans at or under budget (target >= 95 %), measured / budget
(target 0.90-1.00), plan time, and each plan's smallest and largest keep ratio against its allocation
band.

The allocation band (`lpnet.gates.allocation`): the same three models at 0.5 / 0.7 / 0.9 of their
*predicted* unpruned latency, planned in every mode (architecture-only; weights, on the models'
random torchvision initialisation; train, whose planned allocation fixes its widths before any
training, so its widths are computed here without training), each with the default band and with
none (`max_skew` None, `min_keep_ratio` 0.05). Reported per plan: the smallest and largest keep
ratio, the band, the groups outside the band or under the minimum, and whether the plan warned about
them. Nothing is timed in this part: with `--predictor FILE --part band` the bench measures nothing.

By default every timing (the variants fitted on, the unpruned networks the budgets come from,
verification rounds, final checks) is taken against the speed probe and reported at the speed the
machine had when the bench started (profiler/verification.py); the raw medians are saved beside
them and summarised too. `--no-speed-probe` judges raw medians.

The predictor comes from `--predictor FILE` (a safetensors artifact from `lpnet fit`) or is fitted
here on width variants of the three models measured with the quick protocol. Timings on this
machine (2 cores, 1 thread):

- `--quick` (64x64 inputs, 12 variants per model, 300 fitting steps): about 1-2 minutes in all.
- default (224x224 inputs, 30 variants per model, 1500 fitting steps): measuring about 4-6 minutes
  (resnet50 at 224 is ~0.2 s per forward), fitting 1-3 minutes, planning and verifying 2-3 minutes.

Run: `.venv/bin/python bench/plan_quality.py --quick` (or `-m bench.plan_quality`) (writes
bench/results/plan_quality*.json/png); `--part quality` or `--part band` runs one part only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file, sys.path[0] is bench/, where bench/profiler.py would shadow the profiler package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lpnet.arch.from_torch import network_from_torchvision, torchvision_model  # noqa: E402
from lpnet.arch.ir import Network  # noqa: E402
from lpnet.errors import BudgetInfeasible  # noqa: E402
from lpnet.gates.allocation import AllocationBand, AllocationPolicy, BandedFit  # noqa: E402
from lpnet.gates.chart import layer_latency_chart  # noqa: E402
from lpnet.gates.options import PlanMode  # noqa: E402
from lpnet.gates.planner import PlanOptions, plan  # noqa: E402
from lpnet.gates.problem import PlanningProblem  # noqa: E402
from lpnet.gates.result import PlanResult  # noqa: E402
from lpnet.gates.training import planned_widths  # noqa: E402
from lpnet.predictor.artifact import dump_predictor, load_predictor  # noqa: E402
from lpnet.predictor.model import LPNetConfig  # noqa: E402
from lpnet.predictor.predict import LatencyPredictor  # noqa: E402
from lpnet.predictor.samples import NetworkSample  # noqa: E402
from lpnet.predictor.train import TrainConfig, fit_predictor  # noqa: E402
from profiler.backends.base import get_backend  # noqa: E402
from profiler.environment import retain_freed_memory  # noqa: E402
from profiler.protocol import TimingProtocol  # noqa: E402
from profiler.variants import measure_width_variants  # noqa: E402
from profiler.verification import NetworkMeter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
BUDGET_SHARES = (0.5, 0.7, 0.9)
BAND_MODES = ("architecture-only", "weights", "train")
# The band switched off: no factor around the uniform ratio, the grid's own floor as the minimum.
NO_BAND = AllocationPolicy(max_skew=None, min_keep_ratio=0.05)
# Measurement of final plans: tighter than the quick protocol used while planning.
CHECK_PROTOCOL = TimingProtocol(
    warmup_runs=3,
    warmup_ms=100,
    min_repeat_ms=400,
    min_repetitions=10,
    target_precision=0.02,
    max_seconds=8.0,
)


def fit_here(
    networks: dict[str, Network], variants: int, steps: int, seed: int, meter: NetworkMeter
) -> tuple[LatencyPredictor, dict[str, float]]:
    def measure(network: Network) -> float:
        return meter(network).ms

    rng = random.Random(seed)
    samples: list[NetworkSample] = []
    started = time.perf_counter()
    for name, network in networks.items():
        t0 = time.perf_counter()
        samples += measure_width_variants(network, variants, measure, seed=rng.randrange(2**31))
        print(f"  measured {variants} variants of {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    measuring = time.perf_counter() - started
    started = time.perf_counter()
    torch.manual_seed(seed)
    predictor = fit_predictor(samples, LPNetConfig(), TrainConfig(steps=steps, seed=seed))
    fitting = time.perf_counter() - started
    print(f"  fitted LPNet on {len(samples)} networks in {fitting:.1f} s (measuring took {measuring:.1f} s)")
    return predictor, {"measuring_s": measuring, "fitting_s": fitting, "samples": len(samples)}


def quality_rows(
    networks: dict[str, Network],
    predictor: LatencyPredictor,
    reference: NetworkMeter,
    size: int,
    max_rounds: int,
    seed: int,
    suffix: str,
) -> list[dict[str, Any]]:
    """Plans for shares of each network's measured latency, predicted and verified, measured again."""
    # Verification and the final check use the same protocol; they are still separate timings.
    plan_measure = check = reference
    rows: list[dict[str, Any]] = []
    for name, network in networks.items():
        unpruned = check(network)
        unpruned_ms = unpruned.ms
        predicted_unpruned = predictor.predict(network).total_ms
        print(f"\n{name} @ {size}: measured {unpruned_ms:.2f} ms, predicted {predicted_unpruned:.2f} ms")
        for share in BUDGET_SHARES:
            budget = share * unpruned_ms
            for verified in (False, True):
                options = PlanOptions(max_rounds=max_rounds, seed=seed)
                try:
                    result = plan(
                        network, predictor, budget, options, measure=plan_measure if verified else None
                    )
                except BudgetInfeasible as exc:
                    rows.append(
                        {
                            "model": name,
                            "input": size,
                            "share": share,
                            "budget_ms": budget,
                            "verified": verified,
                            "infeasible": True,
                            "min_achievable_ms": exc.min_achievable_ms,
                            "measured_min": exc.details.get("measured", False),
                        }
                    )
                    print(f"  budget {share:.1f} ({budget:6.2f} ms): infeasible, {exc.message}")
                    continue
                final = check(result.pruned_network)
                measured = final.ms
                row = {
                    "model": name,
                    "input": size,
                    "share": share,
                    "budget_ms": budget,
                    "verified": verified,
                    "rounds": len(result.rounds),
                    "round_measured_ms": [r.measured_ms for r in result.rounds],
                    "round_measured_raw_ms": [r.measured_raw_ms for r in result.rounds],
                    "predicted_ms": result.predicted.total_ms,
                    "measured_ms": measured,
                    "ratio": measured / budget,
                    "met": measured <= budget,
                    # Raw: the final check's median as timed, against the unpruned network's raw median.
                    "measured_raw_ms": final.raw_ms,
                    "probe_ms": final.probe_ms,
                    "raw_ratio": final.raw_ms / (share * unpruned.raw_ms),
                    "plan_s": result.plan_seconds,
                    "widths": result.widths,
                    "flops_ratio": result.cost_after.flops / result.cost_before.flops,
                    **allocation_fields(result),
                    "infeasible": False,
                }
                rows.append(row)
                print(
                    f"  budget {share:.1f} ({budget:6.2f} ms) {'verified' if verified else 'predicted'}: "
                    f"predicted {row['predicted_ms']:6.2f} measured {measured:6.2f} ms "
                    f"ratio {row['ratio']:.3f} {'OK ' if row['met'] else 'OVER'} rounds {row['rounds']} "
                    f"plan {row['plan_s']:.1f} s FLOPs x{row['flops_ratio']:.2f} "
                    f"keep {row['keep_ratio_min']:.2f}-{row['keep_ratio_max']:.2f}"
                    f"{' OUTSIDE BAND' if row['groups_outside_band'] else ''}",
                    flush=True,
                )
                if verified and share == 0.5:
                    (RESULTS / f"plan_quality_layers_{name}{suffix}.png").write_bytes(
                        layer_latency_chart(result)
                    )
    return rows


def allocation_fields(result: PlanResult) -> dict[str, Any]:
    """A plan's spread of keep ratios and its band, as row fields."""
    summary = result.allocation
    assert summary is not None
    return {
        "keep_ratio_min": summary.keep_ratio_min,
        "keep_ratio_max": summary.keep_ratio_max,
        "uniform_keep_ratio": summary.uniform_keep_ratio,
        "band_low": summary.band_low,
        "band_high": summary.band_high,
        "groups_outside_band": summary.groups_outside_band,
    }


def allocation_rows(
    networks: dict[str, Network], predictor: LatencyPredictor, size: int, seed: int
) -> list[dict[str, Any]]:
    """Every mode's plan at shares of each network's predicted latency, with the band and without.

    Each row says how uneven the plan is, which groups leave the default band or keep less than its
    minimum, and whether the plan warned about it (a plan without the band is checked against the
    default band too: that is what the band changes).
    """
    default = AllocationPolicy()
    rows: list[dict[str, Any]] = []
    print(f"\nallocation band at shares of the predicted latency ({size}x{size}):")
    for name, network in networks.items():
        problem = PlanningProblem.build(network, predictor)
        unpruned = predictor.predict(network).total_ms
        weights = _random_weights(name, seed)
        for share in BUDGET_SHARES:
            budget = share * unpruned
            try:
                problem.check_feasible(budget)
            except BudgetInfeasible as exc:
                rows.append(
                    {"model": name, "input": size, "share": share, "budget_ms": budget, "infeasible": True}
                )
                print(f"  {name:12s} {share:.1f} infeasible: {exc.message}")
                continue
            reference = AllocationBand.at(problem, budget, default)
            for mode in BAND_MODES:
                for policy in (default, NO_BAND):
                    started = time.perf_counter()
                    widths, warnings = _plan_widths(
                        network, predictor, problem, budget, mode, policy, weights, seed
                    )
                    seconds = time.perf_counter() - started
                    band = AllocationBand.at(problem, budget, policy) if policy is default else reference
                    summary = band.summary(widths)
                    outside = reference.outside(widths)
                    under = reference.under_minimum(widths)
                    warned = any("allocation band" in w or "min_keep_ratio" in w for w in warnings)
                    row = {
                        "model": name,
                        "input": size,
                        "mode": mode,
                        "share": share,
                        "budget_ms": budget,
                        "band": policy is default,
                        "max_skew": policy.max_skew,
                        "min_keep_ratio": policy.min_keep_ratio,
                        "widths": widths,
                        "keep_ratio_min": summary.keep_ratio_min,
                        "keep_ratio_max": summary.keep_ratio_max,
                        "uniform_keep_ratio": reference.uniform,
                        "default_band": [reference.low_ratio, reference.high_ratio],
                        "groups_outside_default_band": outside,
                        "groups_under_default_minimum": under,
                        "warned": warned,
                        "plan_s": seconds,
                        "infeasible": False,
                    }
                    rows.append(row)
                    print(
                        f"  {name:12s} {share:.1f} {mode:17s} {'band   ' if row['band'] else 'no band'} "
                        f"keep {summary.keep_ratio_min:.2f}-{summary.keep_ratio_max:.2f} "
                        f"(band {reference.low_ratio:.2f}-{reference.high_ratio:.2f} around {reference.uniform:.2f}) "
                        f"outside {len(outside)} under-min {len(under)}{' WARNED' if warned else ''} "
                        f"{seconds:.1f} s",
                        flush=True,
                    )
    return rows


def _random_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    """The torchvision model's state dict at a seeded random initialisation (nothing is downloaded)."""
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in torchvision_model(name).eval().state_dict().items()}


def _plan_widths(
    network: Network,
    predictor: LatencyPredictor,
    problem: PlanningProblem,
    budget_ms: float,
    mode: str,
    policy: AllocationPolicy,
    weights: dict[str, torch.Tensor],
    seed: int,
) -> tuple[list[int], list[str]]:
    """The widths one mode plans (unverified) under `policy`, and the plan's warnings."""
    if mode == "train":
        banded = BandedFit(problem, policy)
        widths = planned_widths(banded, budget_ms, seed)
        return widths, banded.band(budget_ms).warnings(widths)
    options = PlanOptions(
        mode=PlanMode(mode), max_skew=policy.max_skew, min_keep_ratio=policy.min_keep_ratio, seed=seed
    )
    result = plan(network, predictor, budget_ms, options, weights=weights if mode == "weights" else None)
    return result.widths, result.warnings


def allocation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode, with the band and without: plans, plans leaving the default band or its minimum, and
    those that did so without a warning (the target: none)."""
    summary: dict[str, Any] = {"infeasible_budgets": sum(r["infeasible"] for r in rows)}
    for mode in BAND_MODES:
        for banded in (True, False):
            subset = [r for r in rows if not r["infeasible"] and r["mode"] == mode and r["band"] is banded]
            if not subset:
                continue
            leaving = [
                r for r in subset if r["groups_outside_default_band"] or r["groups_under_default_minimum"]
            ]
            summary[f"{mode}{'' if banded else '_no_band'}"] = {
                "plans": len(subset),
                "outside_default_band": sum(bool(r["groups_outside_default_band"]) for r in subset),
                "under_default_minimum": sum(bool(r["groups_under_default_minimum"]) for r in subset),
                "leaving_without_warning": sum(not r["warned"] for r in leaving),
                "min_keep_ratio_seen": min(r["keep_ratio_min"] for r in subset),
                "max_spread": max(r["keep_ratio_max"] - r["keep_ratio_min"] for r in subset),
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tag", help="suffix of the result files (default: '_quick' with --quick, else none)"
    )
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, fewer variants and fitting steps")
    parser.add_argument("--predictor", type=Path, help="a fitted predictor artifact (safetensors)")
    parser.add_argument("--input-size", type=int, help="square input size (default 224, quick 64)")
    parser.add_argument("--variants", type=int, help="measured width variants per model when fitting")
    parser.add_argument("--fit-steps", type=int, help="LPNet fitting steps per ensemble member")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--max-rounds", type=int, default=PlanOptions().max_rounds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-predictor", type=Path, help="write the fitted predictor here")
    parser.add_argument(
        "--no-speed-probe", action="store_true", help="judge raw medians instead of the nominal speed"
    )
    parser.add_argument(
        "--part",
        choices=("all", "quality", "band"),
        default="all",
        help="quality: plans measured against budgets; band: every mode's keep ratios against the "
        "allocation band, nothing timed (with --predictor); default: both",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    retain_freed_memory()  # the profiler's default allocator policy: timings independent of history
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores; latencies measured now are not representative"
        )
    size = args.input_size or (64 if args.quick else 224)
    variants = args.variants or (12 if args.quick else 30)
    steps = args.fit_steps or (300 if args.quick else 1500)
    suffix = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    bench_started = time.perf_counter()

    networks = {name: network_from_torchvision(name, (1, 3, size, size)) for name in args.models}
    # One probe and one nominal speed for every timing of the run (none with --no-speed-probe).
    backend = get_backend("torch-cpu", threads=1)
    # The band part alone with a predictor file times nothing, not even the probe.
    timed = args.part != "band" or args.predictor is None
    reference = (
        NetworkMeter.probed(backend, CHECK_PROTOCOL)
        if timed and not args.no_speed_probe
        else NetworkMeter(backend, CHECK_PROTOCOL)
    )
    nominal = reference.nominal_probe_ms
    if nominal is not None:
        print(f"speed probe {nominal:.3f} ms now: timings are reported at this speed")
    fit_info: dict[str, Any] = {}
    if args.predictor:
        predictor = load_predictor(args.predictor.read_bytes())
        fit_info = {"artifact": args.predictor.name}
    else:
        print(f"fitting a predictor from measurements at {size}x{size}, 1 thread:")
        predictor, fit_info = fit_here(
            networks, variants, steps, args.seed, reference.with_protocol(TimingProtocol.quick())
        )
        if args.save_predictor:
            args.save_predictor.write_bytes(
                dump_predictor(predictor, {"bench": "plan_quality", "input": size})
            )

    rows = (
        quality_rows(networks, predictor, reference, size, args.max_rounds, args.seed, suffix)
        if args.part in ("all", "quality")
        else []
    )
    band_rows = allocation_rows(networks, predictor, size, args.seed) if args.part in ("all", "band") else []
    summary: dict[str, Any] = {}
    for verified in (False, True):
        subset = [r for r in rows if r["verified"] is verified and not r["infeasible"]]
        if not subset:
            continue
        ratios = [r["ratio"] for r in subset]
        summary["verified" if verified else "predicted_only"] = {
            "plans": len(subset),
            "refused_infeasible": sum(r["verified"] is verified and r["infeasible"] for r in rows),
            "share_at_or_under_budget": sum(r["met"] for r in subset) / len(subset),
            "share_ratio_in_0.90_1.00": sum(0.9 <= x <= 1.0 for x in ratios) / len(subset),
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "median_plan_s": statistics.median(r["plan_s"] for r in subset),
            "max_plan_s": max(r["plan_s"] for r in subset),
            "raw_share_at_or_under_budget": sum(r["raw_ratio"] <= 1.0 for r in subset) / len(subset),
            "raw_median_ratio": statistics.median(r["raw_ratio"] for r in subset),
            "outside_band": sum(bool(r["groups_outside_band"]) for r in subset),
            "min_keep_ratio_seen": min(r["keep_ratio_min"] for r in subset),
        }
    band_summary = allocation_summary(band_rows)
    total = time.perf_counter() - bench_started
    print("\nsummary:")
    for key, value in {**summary, **band_summary}.items():
        if not isinstance(value, dict):
            print(f"  {key}: {value}")
            continue
        print(
            f"  {key}: "
            + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        )
    print(f"bench took {total:.0f} s")
    report = {
        "input_size": size,
        "threads": 1,
        "predictor": fit_info,
        "rows": rows,
        "summary": summary,
        "bench_seconds": total,
        "load_average_at_start": load,
        "max_rounds": args.max_rounds,
        "nominal_probe_ms": nominal,
        "judged": "latency at the nominal probe speed" if nominal is not None else "raw median",
        "note": "measured in one process; between-process spread on this machine is 2-10 % (DESIGN.md)",
    }
    if rows:
        (RESULTS / f"plan_quality{suffix}.json").write_text(json.dumps(report, indent=2))
        _plot(rows, RESULTS / f"plan_quality{suffix}.png", size, args.max_rounds)
        print(f"wrote {RESULTS / f'plan_quality{suffix}.json'} and .png")
    if band_rows:
        band_report = {
            "input_size": size,
            "predictor": fit_info,
            "default_policy": {
                "max_skew": AllocationPolicy().max_skew,
                "min_keep_ratio": AllocationPolicy().min_keep_ratio,
            },
            "rows": band_rows,
            "summary": band_summary,
        }
        (RESULTS / f"plan_quality_band{suffix}.json").write_text(json.dumps(band_report, indent=2))
        print(f"wrote {RESULTS / f'plan_quality_band{suffix}.json'}")


def _plot(rows: list[dict[str, Any]], path: Path, size: int, max_rounds: int) -> None:
    def ratio(model: str, share: float, verified: bool) -> float:
        for r in rows:
            if (r["model"], r["share"], r["verified"]) == (model, share, verified) and not r["infeasible"]:
                return float(r["ratio"])
        return 0.0  # refused as infeasible: no bar

    cases = sorted(
        {(r["model"], r["share"]) for r in rows},
        key=lambda c: (list(MODELS).index(c[0]) if c[0] in MODELS else 9, c[1]),
    )
    labels = [f"{model}\n{share:.1f}" for model, share in cases]
    predicted_only = [ratio(model, share, False) for model, share in cases]
    verified = [ratio(model, share, True) for model, share in cases]
    figure, axes = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4.5))
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], predicted_only, width=0.4, label="predictor only", color="#9aa5b1")
    axes.bar(
        [p + 0.2 for p in positions],
        verified,
        width=0.4,
        label=f"verified (<= {max_rounds} rounds)",
        color="#2f6db5",
    )
    axes.axhline(1.0, color="black", linewidth=1)
    axes.axhspan(0.9, 1.0, color="#cfe8cf", alpha=0.5, label="target 0.90-1.00")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(labels, fontsize=8)
    axes.set_ylabel("measured / budget")
    axes.set_title(
        f"Plan quality at {size}x{size}, torch CPU, 1 thread (budget = share of unpruned measured)"
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
