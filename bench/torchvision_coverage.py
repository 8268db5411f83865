"""Which torchvision classification models trace into the IR, and how long each conversion takes.

Every model of `torchvision.models.list_models(module=torchvision.models)` is traced by name on the
meta device (`network_from_torchvision`) at its standard 224x224 input (299x299 for Inception v3,
whose stem needs it). Reported per model: ok or the refusal (error code and message), the
conversion's wall-clock seconds, and the IR's layer count and operators.

    python -m bench.torchvision_coverage                 # all 80 models, ~1 min on one core
    python -m bench.torchvision_coverage --models shufflenet_v2_x1_0 convnext_tiny

Saves bench/results/torchvision_coverage.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torchvision

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.errors import LpnetError

RESULTS = Path(__file__).parent / "results"
INPUT_SIZES = {"inception_v3": 299}


def convert(name: str) -> dict[str, Any]:
    size = INPUT_SIZES.get(name, 224)
    start = time.perf_counter()
    try:
        network = network_from_torchvision(name, (1, 3, size, size))
    except LpnetError as exc:
        seconds = time.perf_counter() - start
        return {
            "model": name,
            "ok": False,
            "seconds": round(seconds, 3),
            "code": exc.code,
            "reason": exc.message,
        }
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "ok": True,
        "seconds": round(seconds, 3),
        "layers": len(network.layers),
        "ops": network.op_counts(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--output", type=Path, default=RESULTS / "torchvision_coverage.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or sorted(torchvision.models.list_models(module=torchvision.models))
    rows = []
    for name in names:
        row = convert(name)
        rows.append(row)
        status = f"{row['layers']} layers" if row["ok"] else f"{row['code']}: {row['reason'][:110]}"
        print(f"{name:28s} {row['seconds']:6.2f} s  {status}", flush=True)
    ok = [row for row in rows if row["ok"]]
    slowest = max(rows, key=lambda row: row["seconds"])
    print(f"\n{len(ok)} of {len(rows)} traced; slowest {slowest['model']} in {slowest['seconds']:.2f} s")
    if args.models:
        return
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "traced": len(ok),
        "models": len(rows),
        "max_seconds": slowest["seconds"],
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
