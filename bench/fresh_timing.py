"""Time one network in this fresh process, as the accuracy benches' labels are taken.

    python -m bench.fresh_timing tv:resnet18            # a torchvision model by name, 224x224
    python -m bench.fresh_timing gen:2000000001         # a generated network by seed, from its IR
    python -m bench.fresh_timing wide:wide3x3-1024x7    # a wide-layer probe (bench.networks)
    python -m bench.fresh_timing ir:network.json        # an IR network a bench wrote to a file

Builds the network's own module (torchvision's, or any other network's from its IR), random
weights, torch eager, 1 thread, batch 1, `inference_mode`, freed memory retained unless
`--no-retain-memory`; warms up for 0.3 s, then prints as JSON the median of at least 10 forwards
over at least `--min-seconds`, and the speed probe's median time (`profiler.speed`) right before
and right after them. With `--probed` it then times the network again as a profile does
(`profiler.protocol.measure` under the first run's protocol, the probe right before and right after
every sample) and adds the median ratio of each sample to its probes (`relative`): times the
predictor's nominal probe time, the network's latency at the speed the predictor answers for,
whatever speed the machine ran at in this process. Imports only what building and timing need, so
a label costs little more than its own timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any


def time_one(spec: str, retain_memory: bool, min_seconds: float, probed: bool = False) -> dict[str, float]:
    """Build the network `spec` names and time its forward in this process."""
    import torch

    from profiler.environment import retain_freed_memory
    from profiler.speed import SpeedProbe

    torch.set_num_threads(1)
    if retain_memory:
        retain_freed_memory()
    if spec.startswith("tv:"):
        from lpnet.arch.from_torch import torchvision_model

        module = torchvision_model(spec.removeprefix("tv:")).eval()
        shape: Sequence[int] = (1, 3, 224, 224)
    else:
        from bench.networks import network_of
        from lpnet.arch.build import build_module

        try:
            network = network_of(spec)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        module = build_module(network).eval()
        shape = network.input_shape
    x = torch.randn(*shape)
    times: list[float] = []
    probe = SpeedProbe()
    probe_before = probe.median_ms()
    with torch.inference_mode():
        warm_end = time.perf_counter() + 0.3
        for _ in range(3):
            module(x)
        while time.perf_counter() < warm_end:
            module(x)
        end = time.perf_counter() + min_seconds
        while len(times) < 10 or time.perf_counter() < end:
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1000)
            if len(times) >= 200:
                break
    probe_ms = statistics.mean([probe_before, probe.median_ms()])
    result = {"median_ms": statistics.median(times), "runs": float(len(times)), "probe_ms": probe_ms}
    if probed:
        result |= _probed_timing(module, x, probe)
    return result


def _probed_timing(module: Any, x: Any, probe: Any) -> dict[str, float]:
    """The network timed as a profile times it: each sample between two probe runs."""
    import torch

    from profiler.protocol import TimingProtocol, measure

    def forwards(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            module(x)
        return (time.perf_counter() - start) * 1000 / number

    with torch.inference_mode():
        timing = measure(forwards, TimingProtocol.budgeted(), probe=probe.run)
    assert timing.relative is not None and timing.probe_ms is not None
    return {"relative": timing.relative, "sample_probe_ms": timing.probe_ms}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="tv:<torchvision name>, gen:<seed>, wide:<probe> or ir:<IR JSON file>")
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--no-retain-memory", action="store_true")
    parser.add_argument(
        "--probed", action="store_true", help="also time it as a profile does, relative to the speed probe"
    )
    args = parser.parse_args()
    print(json.dumps(time_one(args.spec, not args.no_retain_memory, args.min_seconds, args.probed)))


if __name__ == "__main__":
    main()
