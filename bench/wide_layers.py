"""Wide-layer probes: development networks of layers wider than a first run times.

The probes of `bench.networks` (not taken from any evaluation family): twelve of wide 1x1 blocks,
each once without and once with a bias, and six of wide 3x3 basic blocks. Each is timed in
`--processes` fresh processes (`bench.fresh_timing --probed`, the accuracy benches' labels: as timed,
and relative to the speed probe, which times the profile's nominal probe time gives the latency at
the speed the predictor answers for), and predicted by LPNet fitted on a profile cache as `bench.unseen_accuracy` fits it.
Prints each network's errors against both labels and saves them as JSON.

    python -m bench.wide_layers --cache profile.jsonl --output bench/results/wide_layers.json
    python -m bench.wide_layers --cache profile.jsonl --reuse-truth bench/results/wide_layers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.networks import wide_networks
from bench.predictor_accuracy import fit_profiled, load
from bench.results_file import save_figures
from bench.unseen_accuracy import Case, independent_timings
from lpnet.arch.ir import Network
from lpnet.predictor.predict import LatencyPredictor
from profiler.environment import cpu_signature

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="a profile cache (bench.unseen_accuracy)")
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--reuse-truth", type=Path, help="take the labels of an earlier run of this bench")
    parser.add_argument("--only", nargs="*", help="probes whose names start so (e.g. wide3x3)")
    parser.add_argument("--output", type=Path, default=RESULTS / "wide_layers.json")
    args = parser.parse_args()
    networks = [n for n in wide_networks() if not args.only or (n.name or "").startswith(tuple(args.only))]
    truth: dict[str, dict[str, list[float]]] = {}
    if args.reuse_truth is not None:
        earlier = json.loads(args.reuse_truth.read_text())
        if earlier["cpu_signature"] != cpu_signature():
            parser.error(f"{args.reuse_truth} was timed on {earlier['cpu_signature']}, not on this CPU")
        truth = {row["content_hash"]: row for row in earlier["rows"] if row.get("process_relative")}
    cases = [
        Case("wide-layers", n.name or "", f"wide:{n.name}", n)
        for n in networks
        if n.content_hash not in truth
    ]
    timed = independent_timings(cases, args.processes, True, args.min_seconds) if cases else {}
    truth |= {case.network.content_hash: timed[case.spec] for case in cases}
    profiled = load(args.cache, "probe")
    if profiled.nominal_probe_ms is None:
        parser.error(f"{args.cache} has no speed-probe times: nothing to scale the labels to")
    predictor = fit_profiled(profiled.samples)
    rows = [
        judged(network, truth[network.content_hash], predictor, profiled.nominal_probe_ms)
        for network in networks
    ]
    for kind in ("wide1x1", "wide3x3"):
        errors = [row["error_at_nominal"] for row in rows if row["network"].startswith(kind)]
        if errors:
            print(
                f"{kind}: {sum(abs(e) <= 0.10 for e in errors)} of {len(errors)} within +-10 % at the nominal speed"
            )
    figures = {"cache": args.cache.name, "nominal_probe_ms": profiled.nominal_probe_ms, "rows": rows}
    save_figures(args.output, figures)


def judged(
    network: Network, timing: dict[str, list[float]], predictor: LatencyPredictor, nominal_ms: float
) -> dict[str, Any]:
    """One probe's labels (as timed, and at the profile's nominal speed) beside LPNet's price."""
    measured = statistics.median(timing["process_medians_ms"])
    at_nominal = statistics.median(timing["process_relative"]) * nominal_ms
    prediction = predictor.predict(network)
    predicted = prediction.total_ms
    print(
        f"{network.name:22s} measured {measured:7.2f} ms, at the nominal speed {at_nominal:7.2f} ms  "
        f"lpnet {predicted:7.2f} ms ({predicted / measured - 1:+.1%}, at nominal {predicted / at_nominal - 1:+.1%})"
        f"  warnings {len(prediction.warnings)}"
    )
    return {
        "network": network.name,
        "content_hash": network.content_hash,
        "measured_ms": measured,
        "process_medians_ms": timing["process_medians_ms"],
        "process_relative": timing["process_relative"],
        "at_nominal_ms": at_nominal,
        "lpnet_ms": predicted,
        "error": predicted / measured - 1,
        "error_at_nominal": predicted / at_nominal - 1,
        "warnings": prediction.warnings,
    }


if __name__ == "__main__":
    main()
