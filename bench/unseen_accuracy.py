"""LPNet on networks unlike anything profiled, judged against independent timings.

1. Profile this CPU (1 thread) as the first run does (`service.schemas.common.FIRST_RUN_FAMILIES`): resnet18,
   resnet50, mobilenet_v2, `wide_dense` (dense convolutions on either side of the last-level cache)
   and the `generated` family (seeded random CNNs from the profiling seeds), plus any `--extra-families`,
   whole networks and layers in context, the default protocol capped at 6 s a network, freed memory
   retained, in child processes replaced every `--seconds-per-process` (the first run's 10; 0
   profiles in this one process), for `--budget-minutes` (the first run's 6 by default). A JSONL
   cache makes reruns resume. With `--refine-rounds N`, profiling then goes on as the first run's
   background refining does (`service.first_run.refine`): N rounds sharing `--refine-minutes`, each
   fitted on everything measured so far and sampling where that fit's ensemble disagrees most.
2. Fit LPNet on the profile as the service fits a probed profile (`--labels probe`: every timing
   at the profile's nominal speed-probe time, `profiler.speed`), and two baselines on the same
   samples: a FLOPs+params linear model and an nn-Meter-style per-layer RandomForest sum.
3. Judge on three sets, none of them width variants the fit saw:
   - `profiled-unpruned`: the unpruned networks of the profiled torchvision families;
   - `torchvision-unseen`: torchvision families never profiled;
   - `new-operators`: torchvision families built from operators no profiled family has (global
     mean, channel shuffle, layer norm, attention);
   - `generated-eval`: networks of the generator's evaluation seeds, which profiling never samples.
4. Truth: every network is timed in `--processes` fresh Python processes (`bench.fresh_timing`),
   each building the network's own module (torchvision's by name; a generated network's from its IR), random weights,
   torch eager, 1 thread, batch 1, `inference_mode`, under the allocator policy the profile used;
   the label is the median of the processes' medians, and their spread is reported. Each process
   also times the speed probe; the result gives its median (`truth_probe_ms`) beside the
   predictor's nominal probe time, so a reader sees whether the machine ran at its nominal speed
   while the labels were taken. Each process then times the network again as a profile does, the
   probe around every sample (`bench.fresh_timing --probed`); the median ratio times the profile's
   nominal probe time is a second label, at the speed the predictor answers for (`at_nominal_ms`),
   which LPNet is judged against beside the first.
5. How well the labels repeat (`label_agreement`): how often the medians of two disjoint halves of
   a network's processes agree within +-10 % and +-5 %, for both labels: the ceiling the labels' own
   noise puts on those figures.

Prints a table per set and saves `bench/results/unseen_accuracy.json`.

    python -m bench.unseen_accuracy --budget-minutes 6
    python -m bench.unseen_accuracy --skip-profile          # refit and re-judge on the cached profile
    python -m bench.unseen_accuracy --skip-profile --reuse-truth bench/results/unseen_accuracy.json
    python -m bench.unseen_accuracy --refine-rounds 3 --reuse-truth bench/results/unseen_accuracy.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.predictor_accuracy import fit_profiled, load
from lpnet.arch.from_torch import network_from_torchvision
from lpnet.arch.generator import DEVELOPMENT_SEEDS, EVALUATION_SEEDS, PROFILING_FAMILY, generate_networks
from lpnet.arch.ir import Network
from lpnet.predictor.baselines import FlopsLinear, LayerForestSum
from lpnet.predictor.samples import merge_replicates
from profiler.batch import MeasurementKind
from profiler.coverage import SYNTHETIC_FAMILIES
from profiler.device import local_device_spec
from profiler.environment import DEFAULT_SECONDS_PER_PROCESS, cpu_model, cpu_signature, retain_freed_memory
from profiler.protocol import TimingProtocol
from profiler.runner import make_run_context, run_profile
from profiler.sampling import SamplingConfig, Scorer, StratifiedSampler
from profiler.sinks import JsonlSink
from service.first_run.refine import disagreement
from service.schemas.common import FIRST_RUN_FAMILIES

RESULTS = Path(__file__).parent / "results"
# The first run's torchvision families: their unpruned networks are judged as `profiled-unpruned`.
PROFILED = tuple(name for name in FIRST_RUN_FAMILIES if name not in (*SYNTHETIC_FAMILIES, PROFILING_FAMILY))
UNSEEN_TORCHVISION = (
    "resnet34",
    "vgg11",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "squeezenet1_1",
    "wide_resnet50_2",
    "regnet_x_400mf",
    "googlenet",
    "efficientnet_b0",
    "densenet121",
    "resnext50_32x4d",
)
# Models whose layers only the newer IR operators describe (global mean, channel shuffle, layer
# norm, attention): never profiled by any family above.
NEW_OPERATORS = ("mnasnet1_0", "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16", "swin_t")
GENERATED_EVAL = 12
# The development set: what design decisions about the predictor are judged on, so the sets above
# are judged once, never tuned to. Torchvision families in none of the sets above, and generated
# networks of seeds that neither profiling nor evaluation ever draws.
DEVELOPMENT_TORCHVISION = (
    "alexnet",
    "inception_v3",
    "regnet_y_400mf",
    "regnet_y_1_6gf",
    "efficientnet_v2_s",
    "maxvit_t",
)
GENERATED_DEVELOPMENT = 12
EVALUATION_SETS = ("profiled-unpruned", "torchvision-unseen", "new-operators", "generated-eval")
DEVELOPMENT_SETS = ("development-torchvision", "development-generated")
# The first run's protocol.
PROTOCOL = TimingProtocol.budgeted()


def profile(
    families: list[str],
    cache: Path,
    budget_minutes: float,
    retain_memory: bool,
    seconds_per_process: float | None,
    protocol: TimingProtocol = PROTOCOL,
    scorer: Scorer | None = None,
) -> None:
    """Measure whole networks and in-context layers of `families` into the JSONL cache; with a
    `scorer`, each sample is the candidate it rates highest (the sampler's adaptive mode)."""
    import torch

    torch.set_num_threads(1)
    if retain_memory:
        retain_freed_memory()
    device = local_device_spec(threads=1)
    config = SamplingConfig.for_budget(kinds=(MeasurementKind.NETWORK, MeasurementKind.IN_CONTEXT))
    sampler = StratifiedSampler.for_families(families, device, config)
    backend = device.create_backend()
    sink = JsonlSink(cache, make_run_context(device, protocol, backend))
    try:
        summary = run_profile(
            device,
            sampler,
            sink,
            protocol,
            budget_minutes=budget_minutes,
            backend=backend,
            seconds_per_process=seconds_per_process,
            scorer=scorer,
        )
        print(summary.format_table())
    finally:
        sink.close()


@dataclass(frozen=True)
class Case:
    """One evaluation network and how a fresh process rebuilds it."""

    set_name: str
    name: str
    spec: str  # "tv:<name>" or "gen:<seed>"
    network: Network


def cases(development: bool) -> list[Case]:
    """The evaluation sets, or with `development` the development sets."""
    if development:
        out = [
            Case("development-torchvision", n, f"tv:{n}", network_from_torchvision(n))
            for n in DEVELOPMENT_TORCHVISION
        ]
        for net in generate_networks(DEVELOPMENT_SEEDS, GENERATED_DEVELOPMENT):
            seed = (net.name or "").removeprefix("gen-")
            out.append(Case("development-generated", net.name or "", f"gen:{seed}", net))
        return out
    out = [Case("profiled-unpruned", n, f"tv:{n}", network_from_torchvision(n)) for n in PROFILED]
    out += [Case("torchvision-unseen", n, f"tv:{n}", network_from_torchvision(n)) for n in UNSEEN_TORCHVISION]
    out += [Case("new-operators", n, f"tv:{n}", network_from_torchvision(n)) for n in NEW_OPERATORS]
    for net in generate_networks(EVALUATION_SEEDS, GENERATED_EVAL):
        out.append(
            Case("generated-eval", net.name or "", f"gen:{(net.name or '').removeprefix('gen-')}", net)
        )
    return out


# Fresh-process timing ----------------------------------------------------------------------------


def independent_timings(
    all_cases: Sequence[Case], processes: int, retain_memory: bool, min_seconds: float, probed: bool = True
) -> dict[str, dict[str, list[float]]]:
    """Each case timed in `processes` fresh processes, round after round (drift spreads evenly): per
    spec, the processes' medians (`process_medians_ms`), the speed probe's time in each
    (`process_probe_ms`) and, when `probed`, each one's median ratio to the probe timed around every
    sample, as a profile times (`process_relative`; empty otherwise)."""
    out: dict[str, dict[str, list[float]]] = {
        c.spec: {"process_medians_ms": [], "process_probe_ms": [], "process_relative": []} for c in all_cases
    }
    for round_index in range(processes):
        for case in all_cases:
            command = [sys.executable, "-m", "bench.fresh_timing", case.spec]
            command += ["--min-seconds", str(min_seconds)]
            if probed:
                command.append("--probed")
            if not retain_memory:
                command.append("--no-retain-memory")
            result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
            timing = json.loads(result.stdout.strip().splitlines()[-1])
            out[case.spec]["process_medians_ms"].append(timing["median_ms"])
            out[case.spec]["process_probe_ms"].append(timing["probe_ms"])
            relative = ""
            if probed:
                out[case.spec]["process_relative"].append(timing["relative"])
                relative = f"; {timing['relative']:.2f} probes"
            print(
                f"  round {round_index + 1}/{processes} {case.name:22s} {timing['median_ms']:9.2f} ms "
                f"(probe {timing['probe_ms']:.3f} ms{relative})",
                flush=True,
            )
    return out


# Judging -----------------------------------------------------------------------------------------


def judge(rows: list[dict[str, Any]], key: str, label: str = "measured_ms") -> dict[str, Any]:
    errors = np.array([(r[key] - r[label]) / r[label] for r in rows])
    return {
        "networks": len(rows),
        "within_10pct": int((np.abs(errors) <= 0.10).sum()),
        "within_5pct": int((np.abs(errors) <= 0.05).sum()),
        "median_abs_error": float(np.median(np.abs(errors))),
        "max_abs_error": float(np.abs(errors).max()),
        "rmspe": float(np.sqrt(np.mean(errors**2))),
        "median_signed_error": float(np.median(errors)),
    }


def label_agreement(rows: list[dict[str, Any]], processes: str = "process_medians_ms") -> dict[str, Any]:
    """How well the labels repeat: for every split of a network's fresh processes into two disjoint
    halves, whether the smaller half's median lies within +-10 % (+-5 %) of the larger half's, as
    a prediction must of the label. The share of splits that agree, averaged over the networks, is
    the ceiling the labels' own noise puts on those two figures (a label of all the processes
    repeats somewhat better than either half)."""
    within_10: list[float] = []
    within_5: list[float] = []
    for row in rows:
        medians = row.get(processes) or []
        if len(medians) < 4:
            continue
        gaps = []
        for chosen in itertools.combinations(range(len(medians)), len(medians) // 2):
            small = statistics.median(medians[i] for i in chosen)
            large = statistics.median(m for i, m in enumerate(medians) if i not in chosen)
            gaps.append(abs(small - large) / large)
        within_10.append(statistics.mean(gap <= 0.10 for gap in gaps))
        within_5.append(statistics.mean(gap <= 0.05 for gap in gaps))
    return {
        "networks": len(within_10),
        "within_10pct": statistics.mean(within_10) if within_10 else None,
        "within_5pct": statistics.mean(within_5) if within_5 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-minutes", type=float, default=6.0)
    parser.add_argument(
        "--extra-families",
        nargs="*",
        default=[],
        help="profile these families beside the first run's (e.g. op_coverage); use another --cache",
    )
    parser.add_argument("--cache", type=Path, default=RESULTS / "unseen_profile_cache.jsonl")
    parser.add_argument(
        "--refine-rounds",
        type=int,
        default=0,
        help="after the profile, refine as the first run does in the background: this many rounds, "
        "each fitted on the cache so far and profiling where that fit's ensemble disagrees most "
        "(the service's scorer); the cache as it stood before each round is kept beside it "
        "(<cache>.round<N>.jsonl) so each predictor version can be judged with --skip-profile",
    )
    parser.add_argument(
        "--refine-minutes",
        type=float,
        default=24.0,
        help="profiling time the refining rounds share (the first run's 24)",
    )
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument(
        "--seconds-per-process",
        type=float,
        default=DEFAULT_SECONDS_PER_PROCESS,
        help="profile in child processes replaced after this many seconds, as the first run does; 0 "
        "profiles in this process",
    )
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--fit-seed", type=int, default=0, help="the fit's seed (TrainConfig.seed)")
    parser.add_argument("--no-retain-memory", action="store_true")
    parser.add_argument(
        "--reuse-truth",
        type=Path,
        help="take the fresh-process timings of the networks an earlier result file has instead of "
        "timing them again (the others are timed). Labels of another machine of the same CPU signature "
        "compare arms with each other, not with the targets: between two Xeons of one type the probe "
        "left a 10-15 %% swing between compute-bound and memory-bound networks",
    )
    parser.add_argument(
        "--development",
        action="store_true",
        help="judge on the development sets (what predictor design is decided on) instead of the "
        "evaluation sets; saves unseen_accuracy_development.json",
    )
    parser.add_argument(
        "--labels",
        choices=("probe", "ms"),
        default="probe",
        help="fit on latencies at the profile's nominal speed-probe time, as the service fits a "
        "probed profile (default), or on the milliseconds as timed",
    )
    parser.add_argument(
        "--target-precision",
        type=float,
        default=PROTOCOL.target_precision,
        help="the profile's stopping rule: time each sample until its median is this precise (or the cap)",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or RESULTS / (
        "unseen_accuracy_development.json" if args.development else "unseen_accuracy.json"
    )
    if args.refine_rounds < 0 or (args.refine_rounds and args.refine_minutes <= 0):
        parser.error("--refine-rounds must be at least 0, and --refine-minutes positive when it is not")
    if args.skip_profile and args.refine_rounds and not args.cache.exists():
        parser.error(f"--refine-rounds refines a profile, and {args.cache} does not exist")
    retain = not args.no_retain_memory
    families = [*FIRST_RUN_FAMILIES, *args.extra_families]
    seconds_per_process = args.seconds_per_process or None
    protocol = PROTOCOL.model_copy(update={"target_precision": args.target_precision})
    started = time.perf_counter()
    if not args.skip_profile:
        profile(
            families,
            args.cache,
            args.budget_minutes,
            retain_memory=retain,
            seconds_per_process=seconds_per_process,
            protocol=protocol,
        )
    for round_ in range(1, args.refine_rounds + 1):
        shutil.copyfile(args.cache, args.cache.with_suffix(f".round{round_}.jsonl"))
        guide = fit_profiled(load(args.cache, args.labels).samples, args.steps, args.fit_seed)
        print(f"refining round {round_} of {args.refine_rounds}", flush=True)
        profile(
            families,
            args.cache,
            args.refine_minutes / args.refine_rounds,
            retain_memory=retain,
            seconds_per_process=seconds_per_process,
            protocol=protocol,
            scorer=disagreement(guide),
        )
    profile_seconds = time.perf_counter() - started
    import torch

    torch.set_num_threads(1)  # the first run fits with one thread; `fit_seconds` is comparable
    profiled = load(args.cache, args.labels)
    samples = merge_replicates(profiled.samples)
    nominal = profiled.nominal_probe_ms
    fit_started = time.perf_counter()
    predictor = fit_profiled(profiled.samples, args.steps, args.fit_seed)
    fit_seconds = time.perf_counter() - fit_started
    baselines: list[Any] = [FlopsLinear(), LayerForestSum()]
    for baseline in baselines:
        baseline.fit(samples)

    all_cases = cases(args.development)
    truth: dict[str, dict[str, list[float]]] = {}
    if args.reuse_truth is not None:
        earlier = json.loads(args.reuse_truth.read_text())
        timed_on = earlier["protocol"].get("cpu_signature")
        if timed_on != cpu_signature():
            parser.error(
                f"{args.reuse_truth} holds labels timed on {timed_on or 'a CPU it does not identify'}, not "
                f"on this machine's {cpu_signature()}: latencies only compare on the CPU that timed them"
            )
        # A generated network keeps its name when the generator changes: a label is reused only for
        # the same architecture.
        by_hash = {row.get("content_hash"): row for row in earlier["rows"]}
        reused = [case for case in all_cases if case.network.content_hash in by_hash]
        truth = {
            case.spec: {
                key: by_hash[case.network.content_hash].get(key) or []
                for key in ("process_medians_ms", "process_probe_ms", "process_relative")
            }
            for case in reused
        }
    missing = [case for case in all_cases if case.spec not in truth]
    if missing:
        print(f"timing {len(missing)} networks in {args.processes} fresh processes each", flush=True)
        truth |= independent_timings(missing, args.processes, retain, args.min_seconds)
    rows: list[dict[str, Any]] = []
    networks = [c.network for c in all_cases]
    baseline_ms = {b.name: b.predict(networks) for b in baselines}
    for index, case in enumerate(all_cases):
        prediction = predictor.predict(case.network)
        measured = truth[case.spec]["process_medians_ms"]
        relative = truth[case.spec]["process_relative"]
        label = statistics.median(measured)
        rows.append(
            {
                "set": case.set_name,
                "network": case.name,
                "content_hash": case.network.content_hash,
                "measured_ms": label,
                "process_medians_ms": measured,
                "process_spread": (max(measured) - min(measured)) / label,
                "process_probe_ms": truth[case.spec]["process_probe_ms"] or None,
                "process_relative": relative or None,
                # The label at the profile's nominal probe speed: what the predictor answers for.
                "at_nominal_ms": statistics.median(relative) * nominal if relative and nominal else None,
                "lpnet_ms": prediction.total_ms,
                "interval_ms": [prediction.low_ms, prediction.high_ms],
                "in_interval": prediction.low_ms <= label <= prediction.high_ms,
                "warnings": len(prediction.warnings),
                "warning_texts": prediction.warnings,
                **{f"{name}_ms": float(values[index]) for name, values in baseline_ms.items()},
            }
        )
    summary: dict[str, Any] = {}
    for set_name in (*(DEVELOPMENT_SETS if args.development else EVALUATION_SETS), "all"):
        chosen = [r for r in rows if set_name in ("all", r["set"])]
        summary[set_name] = {
            "lpnet": judge(chosen, "lpnet_ms"),
            **{name: judge(chosen, f"{name}_ms") for name in baseline_ms},
            "interval_coverage": sum(r["in_interval"] for r in chosen) / len(chosen),
            "interval_median_half_width": statistics.median(
                (r["interval_ms"][1] - r["interval_ms"][0]) / 2 / r["lpnet_ms"] for r in chosen
            ),
            "flagged": sum(r["warnings"] > 0 for r in chosen),
            # The warnings' two failures: a network more than 25 % off with none, and a network
            # within 10 % with some (an alarm a user learns to ignore).
            "unflagged_beyond_25pct": sum(r["warnings"] == 0 and _error(r) > 0.25 for r in chosen),
            "flagged_within_10pct": sum(r["warnings"] > 0 and _error(r) <= 0.10 for r in chosen),
            "median_process_spread": statistics.median(r["process_spread"] for r in chosen),
            "label_agreement": label_agreement(chosen),
        }
        at_nominal = [r for r in chosen if r["at_nominal_ms"] is not None]
        if at_nominal:
            # Judged against the labels at the nominal probe speed: the machine's speed in each label
            # process taken out as the profile takes it out of its own timings.
            summary[set_name]["lpnet_at_nominal"] = judge(at_nominal, "lpnet_ms", label="at_nominal_ms")
            summary[set_name]["label_agreement_at_nominal"] = label_agreement(at_nominal, "process_relative")
            summary[set_name]["interval_coverage_at_nominal"] = sum(
                r["interval_ms"][0] <= r["at_nominal_ms"] <= r["interval_ms"][1] for r in at_nominal
            ) / len(at_nominal)
    print(
        f"\n{'set':20s} {'model':26s} {'<=10%':>7s} {'<=5%':>6s} {'median|e|':>10s} {'max|e|':>8s} "
        f"{'RMSPE':>7s} {'median e':>9s}"
    )
    for set_name, figures in summary.items():
        for model in ["lpnet", *baseline_ms]:
            f = figures[model]
            print(
                f"{set_name:20s} {model:26s} {f['within_10pct']:>3d}/{f['networks']:<3d} "
                f"{f['within_5pct']:>2d}/{f['networks']:<3d} {f['median_abs_error']:>9.1%} "
                f"{f['max_abs_error']:>7.1%} {f['rmspe']:>7.1%} {f['median_signed_error']:>+8.1%}"
            )
        print(
            f"{set_name:20s} interval coverage {figures['interval_coverage']:.0%} (median half-width "
            f"{figures['interval_median_half_width']:.1%}), flagged {figures['flagged']} "
            f"(beyond 25 % unflagged {figures['unflagged_beyond_25pct']}, within 10 % flagged "
            f"{figures['flagged_within_10pct']})"
        )
        _print_labels(set_name, figures)
    print("\nper network (error of LPNet):")
    for r in rows:
        error = (r["lpnet_ms"] - r["measured_ms"]) / r["measured_ms"]
        nominal_note = ""
        if r["at_nominal_ms"] is not None:
            nominal_note = (
                f" (at nominal {r['at_nominal_ms']:.2f}: {r['lpnet_ms'] / r['at_nominal_ms'] - 1:+.1%})"
            )
        print(
            f"  {r['set']:20s} {r['network']:22s} measured {r['measured_ms']:8.2f} ms "
            f"(spread {r['process_spread']:.1%}) lpnet {r['lpnet_ms']:8.2f} ({error:+.1%}){nominal_note} "
            f"[{r['interval_ms'][0]:.2f}, {r['interval_ms'][1]:.2f}] warnings {r['warnings']}"
        )
    all_probes = [ms for timings in truth.values() for ms in timings["process_probe_ms"]]
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": {
            "profile_families": families,
            "profile_budget_minutes": args.budget_minutes if not args.skip_profile else None,
            "profile_seconds_per_process": seconds_per_process if not args.skip_profile else None,
            "profile_cache": args.cache.name,
            "profile_target_precision": args.target_precision if not args.skip_profile else None,
            "refine_rounds": args.refine_rounds,
            "refine_minutes": args.refine_minutes if args.refine_rounds else None,
            "profile_seconds": profile_seconds,
            "fit_seconds": fit_seconds,
            "training_networks": len(samples),
            "truth": f"median of {args.processes} fresh processes, each the median of >= 10 forwards over "
            f">= {args.min_seconds} s; torch eager, 1 thread, batch 1, inference_mode, random weights",
            "allocator": "freed memory retained (mallopt)" if retain else "glibc default",
            "cpu_model": cpu_model(),
            "cpu_signature": cpu_signature(),
            "truth_reused_from": str(args.reuse_truth.name) if args.reuse_truth else None,
            "labels": args.labels,
            "fit_seed": args.fit_seed,
            "interval": "cross-validation+ over the members' folds",
            "nominal_probe_ms": nominal,
            # How fast the machine ran while the truth was timed, next to the speed the predictor
            # answers for (None: the truth was timed without the probe).
            "truth_probe_ms": statistics.median(all_probes) if all_probes else None,
            "profile_cache_rows": sum(1 for _ in args.cache.open()) if args.cache.exists() else 0,
        },
        "summary": summary,
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {output}")


def _print_labels(set_name: str, figures: dict[str, Any]) -> None:
    """How well a set's labels repeat, and LPNet against the labels at the nominal probe speed."""
    for key, what in (("label_agreement", "as timed"), ("label_agreement_at_nominal", "at nominal speed")):
        agreement = figures.get(key)
        if agreement and agreement["networks"]:
            print(
                f"{set_name:20s} labels {what}: halves of the processes agree within 10 % in "
                f"{agreement['within_10pct']:.0%}, within 5 % in {agreement['within_5pct']:.0%}"
            )
    nominal = figures.get("lpnet_at_nominal")
    if nominal:
        print(
            f"{set_name:20s} lpnet against labels at nominal speed: {nominal['within_10pct']}/"
            f"{nominal['networks']} within 10 %, {nominal['within_5pct']} within 5 %, RMSPE "
            f"{nominal['rmspe']:.1%}, median {nominal['median_signed_error']:+.1%}, interval coverage "
            f"{figures['interval_coverage_at_nominal']:.0%}"
        )
    print(f"{set_name:20s} median process spread {figures['median_process_spread']:.0%}")


def _error(row: dict[str, Any]) -> float:
    """LPNet's absolute relative error on one result row."""
    return abs(row["lpnet_ms"] - row["measured_ms"]) / row["measured_ms"]


if __name__ == "__main__":
    main()
