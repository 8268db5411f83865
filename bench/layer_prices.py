"""Where a fitted predictor's price of a network goes wrong, layer by layer.

Fits LPNet on a profile cache as `bench.unseen_accuracy` does (latencies at the profile's nominal
probe time), then times each named network in context in this process as a profile times it
(`profiler.measure.measure_in_context`, the first run's protocol, the speed probe around every
sample), `--repeats` times, and scales every layer to the nominal speed by its network's ratio to
the probe. Prints and saves, per network, the whole network measured and predicted, each rate
kind's predicted and measured sum, and every convolution's and pool's own ratio.

    python -m bench.layer_prices --cache profile.jsonl gen:2000000003 tv:regnet_y_400mf

What this shows steers predictor design, so it takes only development networks (`gen:` seeds of
`DEVELOPMENT_SEEDS`, the development torchvision families of `bench.unseen_accuracy` and the
wide-layer probes of `bench.networks`) and refuses the rest: a network looked at layer by layer is no
longer unseen.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.networks import network_of
from bench.predictor_accuracy import fit_profiled, load
from bench.results_file import save_figures
from bench.unseen_accuracy import DEVELOPMENT_TORCHVISION
from lpnet.arch.generator import DEVELOPMENT_SEEDS
from lpnet.arch.ir import Network
from lpnet.predictor.features import layer_rate_kind
from lpnet.predictor.predict import LatencyPredictor

RESULTS = Path(__file__).resolve().parent / "results"
# Kinds whose layers are listed one by one.
_LISTED = ("conv2d", "conv2d_depthwise", "conv2d_grouped", "adaptive_avgpool2d")


def development_network(spec: str) -> Network:
    """The network `spec` names (`bench.networks`), if it is development material."""
    kind, _, value = spec.partition(":")
    development = (
        (kind == "gen" and value.isdigit() and int(value) in DEVELOPMENT_SEEDS)
        or (kind == "tv" and value in DEVELOPMENT_TORCHVISION)
        or kind == "wide"
    )
    if not development:
        raise SystemExit(
            f"{spec!r} is not a development network: give gen:<seed in {DEVELOPMENT_SEEDS.start}.."
            f"{DEVELOPMENT_SEEDS.stop - 1}>, tv:<one of {', '.join(DEVELOPMENT_TORCHVISION)}> or wide:<probe>"
        )
    try:
        return network_of(spec)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def layer_prices(
    network: Network, predictor: LatencyPredictor, nominal_ms: float, repeats: int
) -> dict[str, Any]:
    """The network's layers timed in context at the nominal speed, beside the predictor's prices."""
    from profiler.device import local_device_spec
    from profiler.measure import measure_in_context
    from profiler.protocol import TimingProtocol
    from profiler.speed import SpeedProbe

    backend = local_device_spec(threads=1).create_backend()
    probe = SpeedProbe().run
    timed: dict[str, list[float]] = defaultdict(list)
    networks: list[float] = []
    for _ in range(repeats):
        result = measure_in_context(network, backend, TimingProtocol.budgeted(), probe=probe)
        assert result.network.relative is not None
        at_nominal = result.network.relative * nominal_ms
        networks.append(at_nominal)
        for name, ms in result.layers_ms.items():
            timed[name].append(ms * at_nominal / result.network.median_ms)
    prediction = predictor.predict(network)
    layers = {layer.name: layer for layer in network.layers}
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    listed = []
    for price in prediction.per_layer:
        kind = layer_rate_kind(layers[price.name])
        measured = statistics.median(timed[price.name]) if timed.get(price.name) else 0.0
        kinds[kind][0] += price.ms
        kinds[kind][1] += measured
        kinds[kind][2] += 1
        if kind in _LISTED and measured > 0:
            layer = layers[price.name]
            listed.append(
                {
                    "layer": price.name,
                    "kind": kind,
                    "in_channels": layer.in_channels,
                    "out_channels": layer.out_channels,
                    "kernel": list(layer.kernel),
                    "stride": list(layer.stride),
                    "groups": layer.groups,
                    "in_hw": list(layer.in_hw),
                    "predicted_ms": price.ms,
                    "measured_ms": measured,
                    "ratio": price.ms / measured,
                }
            )
    return {
        "measured_ms": statistics.median(networks),
        "predicted_ms": prediction.total_ms,
        "kinds": {
            kind: {"layers": int(n), "predicted_ms": p, "measured_ms": m, "ratio": p / m if m else None}
            for kind, (p, m, n) in sorted(kinds.items(), key=lambda item: -item[1][0])
        },
        "layers": listed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("networks", nargs="+", help="gen:<seed>, tv:<torchvision name> or wide:<probe>")
    parser.add_argument("--cache", type=Path, required=True, help="the profile cache to fit on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "layer_prices.json")
    args = parser.parse_args()
    networks = {spec: development_network(spec) for spec in args.networks}
    import torch

    from profiler.environment import retain_freed_memory

    torch.set_num_threads(1)
    retain_freed_memory()
    profiled = load(args.cache, "probe")
    nominal = profiled.nominal_probe_ms
    if nominal is None:
        parser.error(f"{args.cache} has no speed-probe times: nothing to scale to the nominal speed")
    predictor = fit_profiled(profiled.samples)
    figures: dict[str, Any] = {"profile_cache": args.cache.name, "nominal_probe_ms": nominal, "networks": {}}
    for spec, network in networks.items():
        result = layer_prices(network, predictor, nominal, args.repeats)
        figures["networks"][spec] = result
        print(f"\n{spec}: measured {result['measured_ms']:.2f} ms, predicted {result['predicted_ms']:.2f} ms")
        for kind, row in result["kinds"].items():
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
            print(
                f"  {kind:22s} {row['layers']:3d} layers  predicted {row['predicted_ms']:7.3f}  "
                f"measured {row['measured_ms']:7.3f}  ratio {ratio}"
            )
        for row in result["layers"]:
            print(
                f"    {row['layer'][:30]:30s} {row['kind']:18s} {row['in_channels']:>4d}->{row['out_channels']:<4d} "
                f"k{row['kernel']} s{row['stride']} g{row['groups']} {row['in_hw']}  ratio {row['ratio']:.2f}"
            )
    save_figures(args.output, figures)


if __name__ == "__main__":
    main()
