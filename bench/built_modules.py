"""How fast the module a profile times runs against the user's own: torchvision's module against the
one `lpnet.arch.build.build_module` builds from the same network's IR.

Profiles time built modules (a generated network, a width variant, an uploaded IR); a label, a
verification and a deployment of a torchvision model run torchvision's own module. Whatever makes
the built one slower or faster (how activations write their result, how the graph is called) moves
every prediction of such a network by as much. For each family, both modules are timed in
`--rounds` fresh processes each, alternating, as the accuracy benches take their labels
(`bench.fresh_timing`: 1 thread, batch 1, `inference_mode`, freed memory retained); the ratio of
the median times, each process's median taken relative to its speed probe, is reported.

    python -m bench.built_modules [--rounds 3] [--output bench/results/built_modules.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_file import save_figures

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "resnet18", "efficientnet_b0")


def _relative(spec: str, min_seconds: float) -> float:
    """One fresh process's median forward time over its speed probe's time."""
    command = [sys.executable, "-m", "bench.fresh_timing", spec, "--min-seconds", str(min_seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    return float(timing["median_ms"]) / float(timing["probe_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--output", type=Path, default=RESULTS / "built_modules.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    from lpnet.arch.from_torch import network_from_torchvision

    families = [name for name in args.families.split(",") if name]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        files = {}
        for name in families:
            files[name] = Path(directory) / f"{name}.json"
            files[name].write_text(network_from_torchvision(name).model_dump_json())
        own: dict[str, list[float]] = {name: [] for name in families}
        built: dict[str, list[float]] = {name: [] for name in families}
        for round_index in range(args.rounds):
            for name in families:
                own[name].append(_relative(f"tv:{name}", args.min_seconds))
                built[name].append(_relative(f"ir:{files[name]}", args.min_seconds))
                print(
                    f"round {round_index + 1}/{args.rounds} {name:22s} own {own[name][-1]:8.2f} probes, "
                    f"built {built[name][-1]:8.2f}",
                    flush=True,
                )
    for name in families:
        ratio = statistics.median(built[name]) / statistics.median(own[name])
        rows.append(
            {"family": name, "own_probes": own[name], "built_probes": built[name], "built_over_own": ratio}
        )
        print(f"{name:22s} built / own {ratio:.3f}")
    save_figures(args.output, {"rounds": args.rounds, "min_seconds": args.min_seconds, "rows": rows})


if __name__ == "__main__":
    main()
