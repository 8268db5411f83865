"""Wide 1x1 blocks with and without a bias: a development probe of layers wider than a first run times.

Twelve networks built here (not taken from any evaluation family): a light stem (3x3 convolutions,
stride 2, to 32 and then C channels at HxH), three blocks of 1x1 C->4C, ReLU, 1x1 4C->C and a
residual add, a global pool and a classifier; for (C, H) in `SHAPES`, each once without and once
with a bias on its 1x1 convolutions. Each is timed in `--processes` fresh processes
(`bench.fresh_timing`, the accuracy benches' labels), and predicted by LPNet fitted on a profile
cache as `bench.unseen_accuracy` fits it. Prints each network's error and saves them as JSON.

    python -m bench.wide_layers --cache profile.jsonl --output bench/results/wide_layers.json
    python -m bench.wide_layers --cache profile.jsonl --reuse-truth bench/results/wide_layers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.predictor_accuracy import load
from bench.results_file import save_figures
from bench.unseen_accuracy import Case, independent_timings
from lpnet.arch.ir import Layer, Network, Op
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.samples import merge_replicates
from lpnet.predictor.train import TrainConfig, fit_predictor
from profiler.environment import cpu_signature

RESULTS = Path(__file__).parent / "results"
# (channels, map size) of the blocks: 1x1 convolutions of 0.3 to 1.2 GMACs, 4 to 9 times the largest
# a first-run profile times, at the token counts of vision transformers (196) and wider maps.
SHAPES = ((256, 28), (384, 14), (512, 14), (768, 14), (1024, 7), (192, 56))
BLOCKS = 3
EXPANSION = 4


def _layer(
    name: str, op: Op, inputs: list[str], channels: tuple[int, int], hw: tuple[int, int], **kw: Any
) -> Layer:
    """A layer from `hw` = (input size, output size) of square maps; `kw` sets kernel, stride, bias."""
    kernel, stride = kw.get("kernel", 1), kw.get("stride", 1)
    return Layer(
        name=name,
        op=op,
        inputs=inputs,
        in_channels=channels[0],
        out_channels=channels[1],
        in_hw=(hw[0], hw[0]),
        out_hw=(hw[1], hw[1]),
        kernel=(kernel, kernel),
        stride=(stride, stride),
        padding=(kernel // 2, kernel // 2),
        bias=kw.get("bias", False),
    )


def wide_network(channels: int, size: int, bias: bool) -> Network:
    """The stem, `BLOCKS` wide 1x1 blocks of `channels` at `size`x`size`, and a classifier."""
    c, h, wide = channels, size, EXPANSION * channels
    layers = [
        _layer("stem.0", Op.CONV2D, ["input"], (3, 32), (4 * h, 2 * h), kernel=3, stride=2),
        _layer("stem.1", Op.RELU, ["stem.0"], (32, 32), (2 * h, 2 * h)),
        _layer("stem.2", Op.CONV2D, ["stem.1"], (32, c), (2 * h, h), kernel=3, stride=2),
    ]
    x = "stem.2"
    for b in range(BLOCKS):
        layers += [
            _layer(f"block{b}.expand", Op.CONV2D, [x], (c, wide), (h, h), bias=bias),
            _layer(f"block{b}.relu", Op.RELU, [f"block{b}.expand"], (wide, wide), (h, h)),
            _layer(f"block{b}.project", Op.CONV2D, [f"block{b}.relu"], (wide, c), (h, h), bias=bias),
            _layer(f"block{b}.add", Op.ADD, [f"block{b}.project", x], (c, c), (h, h)),
        ]
        x = f"block{b}.add"
    layers += [
        _layer("head.pool", Op.ADAPTIVE_AVGPOOL2D, [x], (c, c), (h, 1)),
        _layer("head.flatten", Op.FLATTEN, ["head.pool"], (c, c), (1, 1)),
        _layer("head.linear", Op.LINEAR, ["head.flatten"], (c, 10), (1, 1), bias=True),
    ]
    name = f"wide1x1-{c}x{h}" + ("-bias" if bias else "")
    return Network(
        name=name,
        family="wide-layers",
        input_shape=(1, 3, 4 * h, 4 * h),
        layers=layers,
        outputs=["head.linear"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="a profile cache (bench.unseen_accuracy)")
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--reuse-truth", type=Path, help="take the labels of an earlier run of this bench")
    parser.add_argument("--output", type=Path, default=RESULTS / "wide_layers.json")
    args = parser.parse_args()
    networks = [wide_network(c, h, bias) for bias in (False, True) for c, h in SHAPES]
    truth: dict[str, list[float]] = {}
    if args.reuse_truth is not None:
        earlier = json.loads(args.reuse_truth.read_text())
        if earlier["cpu_signature"] != cpu_signature():
            parser.error(f"{args.reuse_truth} was timed on {earlier['cpu_signature']}, not on this CPU")
        truth = {row["content_hash"]: row["process_medians_ms"] for row in earlier["rows"]}
    missing = [n for n in networks if n.content_hash not in truth]
    with tempfile.TemporaryDirectory() as folder:
        cases = []
        for network in missing:
            path = Path(folder) / f"{network.name}.json"
            path.write_text(network.to_json())
            cases.append(Case("wide-layers", network.name or "", f"ir:{path}", network))
        timed = (
            independent_timings(cases, args.processes, True, args.min_seconds, probed=False) if cases else {}
        )
    truth |= {case.network.content_hash: timed[case.spec]["process_medians_ms"] for case in cases}
    predictor = fit_predictor(
        merge_replicates(load(args.cache, "probe").samples), LPNetConfig(), TrainConfig()
    )
    rows = []
    for network in networks:
        measured = statistics.median(truth[network.content_hash])
        predicted = predictor.predict(network).total_ms
        rows.append(
            {
                "network": network.name,
                "content_hash": network.content_hash,
                "measured_ms": measured,
                "process_medians_ms": truth[network.content_hash],
                "lpnet_ms": predicted,
                "error": predicted / measured - 1,
            }
        )
        print(
            f"{network.name:22s} measured {measured:7.2f} ms  lpnet {predicted:7.2f} ms ({predicted / measured - 1:+.1%})"
        )
    save_figures(args.output, {"cache": args.cache.name, "rows": rows})


if __name__ == "__main__":
    main()
