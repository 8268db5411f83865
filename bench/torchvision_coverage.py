"""Which torchvision classification models trace into the IR and import from their ONNX export, and
how long each takes.

Every model of `torchvision.models.list_models(module=torchvision.models)` is traced by name on the
meta device (`network_from_torchvision`) at its standard 224x224 input (299x299 for Inception v3,
whose stem needs it). Reported per model: ok or the refusal (error code and message), the
conversion's wall-clock seconds, and the IR's layer count and operators.

Then, unless --skip-onnx, the model is built with random weights, exported by torch.onnx.export at
opset 17 (`export_onnx`) and read back (`network_from_onnx`): ok when the import gives the traced
network's MACs, FLOPs and parameters; reported with the export's and the import's seconds, whether the
content hash is the traced one too, or the refusal. A model whose weights are above protobuf's 2 GiB
cannot be one ONNX file: its export fails, and is reported as such.

    python -m bench.torchvision_coverage                 # all 80 models: ~1 min traced, ~15 min with ONNX
    python -m bench.torchvision_coverage --models swin_t maxvit_t
    python -m bench.torchvision_coverage --skip-onnx     # tracing only

Saves bench/results/torchvision_coverage.json (all models only).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torchvision

from lpnet.arch.counting import network_cost
from lpnet.arch.from_torch import network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.arch.onnx_io.export import ONNX_OPSET
from lpnet.errors import LpnetError

RESULTS = Path(__file__).parent / "results"
INPUT_SIZES = {"inception_v3": 299}


def convert(name: str) -> tuple[dict[str, Any], Network | None]:
    """The tracing row of model `name`, and the traced network (None when it is refused)."""
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
        }, None
    seconds = time.perf_counter() - start
    row = {
        "model": name,
        "ok": True,
        "seconds": round(seconds, 3),
        "layers": len(network.layers),
        "ops": network.op_counts(),
    }
    return row, network


def import_onnx(name: str, traced: Network) -> dict[str, Any]:
    """Export model `name` with random weights at ONNX_OPSET, import it, compare it with `traced`."""
    shape = traced.input_shape
    start = time.perf_counter()
    try:
        data = export_onnx(torchvision_model(name, input_hw=(shape[2], shape[3])), shape)
    except Exception as exc:  # torch's exporter fails in many ways (a file above 2 GiB); report each
        return {"ok": False, "stage": "export", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    export_seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "export_seconds": round(export_seconds, 3),
        "megabytes": round(len(data) / 2**20, 1),
    }
    start = time.perf_counter()
    try:
        network = network_from_onnx(data, name=name)
    except LpnetError as exc:
        return row | {"ok": False, "stage": "import", "code": exc.code, "reason": exc.message}
    row["seconds"] = round(time.perf_counter() - start, 3)
    cost, expected = network_cost(network), network_cost(traced)
    row |= {"ok": cost == expected, "same_hash": network.content_hash == traced.content_hash}
    if cost != expected:
        row |= {"stage": "compare", "reason": f"cost {asdict(cost)}, traced {asdict(expected)}"}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--skip-onnx", action="store_true", help="trace only, no ONNX export and import")
    parser.add_argument("--output", type=Path, default=RESULTS / "torchvision_coverage.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or sorted(torchvision.models.list_models(module=torchvision.models))
    rows = []
    for name in names:
        row, network = convert(name)
        status = f"{row['layers']} layers" if row["ok"] else f"{row['code']}: {row['reason'][:110]}"
        if network is not None and not args.skip_onnx:
            row["onnx"] = import_onnx(name, network)
            status += "; ONNX " + _onnx_status(row["onnx"])
        rows.append(row)
        print(f"{name:28s} {row['seconds']:6.2f} s  {status}", flush=True)
    ok = [row for row in rows if row["ok"]]
    slowest = max(rows, key=lambda row: row["seconds"])
    print(f"\n{len(ok)} of {len(rows)} traced; slowest {slowest['model']} in {slowest['seconds']:.2f} s")
    imported = [row for row in rows if row.get("onnx", {}).get("ok")]
    if not args.skip_onnx:
        print(f"{len(imported)} of {len(rows)} imported from their ONNX export (opset {ONNX_OPSET})")
    if args.models:
        return
    summary: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "traced": len(ok),
        "models": len(rows),
        "max_seconds": slowest["seconds"],
    }
    if not args.skip_onnx:
        onnx_seconds = [row["onnx"]["seconds"] for row in imported]
        summary |= {
            "onnx_opset": ONNX_OPSET,
            "onnx_imported": len(imported),
            "onnx_same_hash": sum(row["onnx"]["same_hash"] for row in imported),
            "onnx_max_seconds": max(onnx_seconds, default=0.0),
        }
    summary["results"] = rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved {args.output}")


def _onnx_status(row: dict[str, Any]) -> str:
    if row["ok"]:
        return (
            f"ok in {row['seconds']:.2f} s ({row['megabytes']} MB exported in {row['export_seconds']:.1f} s)"
        )
    return f"{row['stage']} failed: {row.get('code', '')} {row['reason'][:110]}"


if __name__ == "__main__":
    main()
