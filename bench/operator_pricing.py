"""Where a predictor's error on unseen networks comes from: its per-layer prices against in-context timings.

For each network (the development sets by default), a fresh process builds the network's module
from its IR and times every layer inside real forwards (`profiler.measure.measure_in_context`, the
first run's protocol, 1 thread, freed memory retained). LPNet, fitted on a profile cache
(`bench.unseen_accuracy`'s JSONL), predicts the same layers. Both are summed per rate kind (an
operator, and a convolution by its kernel kind), and the table gives predicted over measured per kind,
beside how many layers of that kind the profile timed in context: the kinds a profile covers
thinly are where its prices come from class peers.

    python -m bench.operator_pricing --cache bench/results/unseen_profile_cache.jsonl
    python -m bench.operator_pricing --cache ... --networks tv:alexnet gen:3000000001

Writes `bench/results/operator_pricing.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.networks import network_of
from bench.predictor_accuracy import fit_profiled, load
from bench.unseen_accuracy import PROTOCOL, cases
from lpnet.predictor.features import RATE_KINDS, layer_rate_kind, rate_kinds
from lpnet.predictor.samples import NetworkSample, merge_replicates, pack_samples
from profiler.environment import cpu_signature, retain_freed_memory

RESULTS = Path(__file__).parent / "results"


def time_in_child(spec: str) -> dict[str, Any]:
    """In-context layer times of `spec`, taken in a fresh process."""
    command = [sys.executable, "-m", "bench.operator_pricing", "--child", spec]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(spec: str) -> None:
    """Time `spec`'s layers in context in this process and print them as JSON."""
    from profiler.backends.base import get_backend
    from profiler.measure import measure_in_context

    torch.set_num_threads(1)
    retain_freed_memory()
    result = measure_in_context(network_of(spec), get_backend("torch-cpu"), PROTOCOL)
    print(json.dumps({"network_ms": result.network.median_ms, "layers_ms": result.layers_ms}))


def profile_coverage(samples: list[NetworkSample]) -> dict[str, int]:
    """Layers timed in context in the profile, per rate kind."""
    data = pack_samples(samples)
    timed = ~torch.isnan(data.layer_target_ms)
    kinds = rate_kinds(data.ops, data.features)[timed]
    counts = torch.bincount(kinds, minlength=len(RATE_KINDS)).tolist()
    return {kind: count for kind, count in zip(RATE_KINDS, counts, strict=True) if count}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=RESULTS / "unseen_profile_cache.jsonl")
    parser.add_argument("--networks", nargs="*", help="tv:<name> / gen:<seed>; default the development sets")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--output", type=Path, default=RESULTS / "operator_pricing.json")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    profiled = load(args.cache, "ms")
    samples = merge_replicates(profiled.samples)
    predictor = fit_profiled(profiled.samples, args.steps)
    specs = args.networks or [case.spec for case in cases(development=True)]
    measured: dict[str, float] = defaultdict(float)
    predicted: dict[str, float] = defaultdict(float)
    rows = []
    for spec in specs:
        network = network_of(spec)
        kinds = {layer.name: layer_rate_kind(layer) for layer in network.layers}
        timing = time_in_child(spec)
        prediction = predictor.predict(network)
        layer_ms = {layer.name: layer.ms for layer in prediction.per_layer}
        net_measured: dict[str, float] = defaultdict(float)
        net_predicted: dict[str, float] = defaultdict(float)
        for name, ms in timing["layers_ms"].items():
            if name in kinds and name in layer_ms:
                net_measured[kinds[name]] += ms
                net_predicted[kinds[name]] += layer_ms[name]
        for kind in net_measured:
            measured[kind] += net_measured[kind]
            predicted[kind] += net_predicted[kind]
        rows.append(
            {
                "network": spec,
                "network_ms": timing["network_ms"],
                "layers_measured_ms": sum(net_measured.values()),
                "layers_predicted_ms": sum(net_predicted.values()),
                "predicted_ms": prediction.total_ms,
                "by_kind": {k: [net_measured[k], net_predicted[k]] for k in net_measured},
            }
        )
        print(
            f"{spec:24s} network {timing['network_ms']:8.2f} ms  layers measured "
            f"{sum(net_measured.values()):8.2f}  predicted {sum(net_predicted.values()):8.2f}  "
            f"total predicted {prediction.total_ms:8.2f}",
            flush=True,
        )
    coverage = profile_coverage(samples)
    print(f"\n{'rate kind':22s} {'measured':>10s} {'predicted':>10s} {'ratio':>6s} {'profiled':>9s}")
    by_kind = {}
    for kind in sorted(measured, key=lambda k: -measured[k]):
        ratio = predicted[kind] / measured[kind] if measured[kind] > 0 else float("nan")
        by_kind[kind] = {
            "measured_ms": measured[kind],
            "predicted_ms": predicted[kind],
            "ratio": ratio,
            "profiled_in_context": coverage.get(kind, 0),
        }
        print(
            f"{kind:22s} {measured[kind]:10.2f} {predicted[kind]:10.2f} {ratio:6.2f} {coverage.get(kind, 0):9d}"
        )
    args.output.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_average": os.getloadavg(),
                "cpu_signature": cpu_signature(),
                "cache": str(args.cache.name),
                "networks": rows,
                "by_kind": by_kind,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
