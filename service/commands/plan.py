"""`lpnet plan`: per-group widths that meet a latency budget on a device, as a table and plan.json.

Locally the plan is made in this process with the device's newest predictor from the database (the
same planner a `POST /v1/plans` job runs); with `--server URL` (or `LPNET_SERVER`) it is requested
from that server through `lpnet.client` and waited for. With `--weights` and `--out` the pruned model
is written too (pruned.safetensors and pruned.onnx): pruned here, or downloaded from the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from lpnet.gates.options import FILTERS, MAX_SKEW, MIN_KEEP_RATIO, ROUND_TO, ModeName
from service.commands._common import CommandError, database_session, info, option_argument, print_table
from service.commands.predict import input_shape, load_network
from service.commands.remote import remote_client, server_arguments
from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers

# The planner's options `lpnet plan` sets, each a flag of the same name.
PLAN_OPTIONS = (MAX_SKEW, MIN_KEEP_RATIO, ROUND_TO, FILTERS)
# The modes a plan request runs (the train mode is `lpnet train`).
MODES: tuple[str, ...] = get_args(ModeName)


def register(subparsers: SubParsers) -> None:
    """Add the ``plan`` command."""
    parser = subparsers.add_parser(
        "plan",
        help="plan per-layer pruning ratios that meet a latency budget on a device",
        description="Plan the kept channels of every channel group so that the network's predicted "
        "latency on the device meets --budget-ms; print the per-group table and write plan.json.",
    )
    parser.add_argument("--device", required=True, help="device name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="a torchvision model name, e.g. resnet50")
    source.add_argument("--json", type=Path, help="a JSON IR file")
    source.add_argument("--onnx", type=Path, help="an ONNX file")
    parser.add_argument(
        "--input-shape", type=input_shape, default=(1, 3, 224, 224), help="N,C,H,W (default: 1,3,224,224)"
    )
    parser.add_argument("--budget-ms", type=float, required=True, help="the latency budget in ms")
    parser.add_argument(
        "--mode",
        choices=MODES,
        help="architecture: widths only; weights: also which filters stay (default: weights with --weights)",
    )
    parser.add_argument(
        "--weights", type=Path, help="a .safetensors state dict of the network (weights mode)"
    )
    parser.add_argument("--verify", action="store_true", help="prune, measure on the device and re-plan")
    for spec in PLAN_OPTIONS:
        option_argument(parser, spec)
    parser.add_argument(
        "--out", type=Path, help="directory for plan.json (and the pruned model with --weights)"
    )
    parser.add_argument(
        "--json-output", action="store_true", help="print the plan as JSON instead of a table"
    )
    server_arguments(parser)
    parser.set_defaults(handler=run_plan)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {spec.name: getattr(args, spec.name) for spec in PLAN_OPTIONS}


def _mode(args: argparse.Namespace) -> str:
    mode: str = args.mode or ("weights" if args.weights is not None else "architecture")
    if mode == "weights" and args.weights is None:
        raise CommandError("--mode weights needs --weights FILE.safetensors", 2)
    return mode


def run_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Plan, print the table (or JSON) and write plan.json when asked."""
    if args.budget_ms <= 0:
        raise CommandError(f"--budget-ms must be positive, got {args.budget_ms}", 2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    result = _remote_plan(args) if args.server else _local_plan(args, settings)
    if args.json_output:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_plan(result)
    if args.out is not None:
        (args.out / "plan.json").write_text(json.dumps(result, indent=2))
        info(f"wrote {args.out / 'plan.json'}")
    return 0


def _local_plan(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import torch

    import lpnet
    from service.devices import get_device
    from service.latency import LatencyService
    from service.plans import local_measure
    from service.predictors import current_predictor

    torch.set_num_threads(settings.torch_threads)
    mode = _mode(args)
    latency = LatencyService.from_settings(settings)
    with database_session(settings) as session:
        device = get_device(session, args.device)
        predictor = latency.predictor(session, current_predictor(session, device).id)
        network = load_network(args, device.batch_size)
    weights = _read_weights(args.weights) if args.weights is not None else None
    measure = local_measure(device) if args.verify else None
    result = lpnet.plan(
        network, predictor, args.budget_ms, mode=mode, weights=weights, measure=measure, **_options(args)
    )
    if weights is not None and args.out is not None:
        _write_pruned(network, weights, result, args.out)
    payload: dict[str, Any] = result.to_dict()
    payload["allocator"] = allocator_document(device.allocator)
    return payload


def allocator_document(policy: str) -> dict[str, Any]:
    """The allocator policy the plan's latencies hold under, as the REST answer gives it."""
    from service.schemas.devices import AllocatorRead

    return AllocatorRead.of(policy).model_dump(mode="json")


def _read_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError) as exc:
        raise CommandError(f"cannot read weights {path}: {exc}") from exc


def _write_pruned(network: Any, weights: dict[str, Any], result: Any, out: Path) -> None:
    from lpnet.pruning import dump_pruned, export_pruned_onnx, module_with_weights, prune_module

    module = module_with_weights(network, weights)
    kept = [g.kept_indices for g in result.groups] if all(g.kept_indices for g in result.groups) else None
    pruned = prune_module(module, network, result.widths, kept)
    _write_pruned_files(out, dump_pruned(pruned), export_pruned_onnx(pruned))


def _write_pruned_files(out: Path, safetensors: bytes, onnx: bytes) -> None:
    (out / "pruned.safetensors").write_bytes(safetensors)
    (out / "pruned.onnx").write_bytes(onnx)
    info(f"wrote {out / 'pruned.safetensors'} and {out / 'pruned.onnx'}")


def _remote_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.verify:
        raise CommandError(
            "--verify with --server: the server verifies on the device; not from the CLI yet", 2
        )
    mode = _mode(args)
    architecture: Any
    if args.json is not None:
        architecture = json.loads(args.json.read_text())
    elif args.onnx is not None:
        from lpnet.arch.onnx_io import network_from_onnx

        architecture = network_from_onnx(args.onnx.read_bytes(), name=args.onnx.stem)
    else:
        architecture = args.model
    with remote_client(args) as client:
        options = _options(args) | {"mode": mode}
        if args.weights is not None:
            upload = client.upload_model(args.weights.stem, args.weights, architecture=architecture)
            options["model_id"] = upload.id
        accepted = client.create_plan(
            args.device, architecture, args.budget_ms, input_shape=args.input_shape, **options
        )
        plan = client.wait_plan(accepted.job_id, progress=_progress)
        if args.weights is not None and args.out is not None:
            _write_pruned_files(
                args.out, client.plan_model(plan.id), client.plan_model(plan.id, format="onnx")
            )
    result: dict[str, Any] = dict(plan.result or {})
    if plan.allocator is not None:
        result["allocator"] = plan.allocator.model_dump(mode="json")
    return result


def _progress(plan: Any) -> None:
    progress = getattr(plan, "progress", None) or {}
    phase = progress.get("phase") if isinstance(progress, dict) else None
    info(f"plan {plan.id}: {plan.status}{f' ({phase})' if phase else ''}")


def print_plan(result: dict[str, Any]) -> None:
    """The per-group table, then the predicted latencies, the allocation band and any warnings."""
    rows = []
    for group in result.get("groups", []):
        layers = group.get("out_layers") or []
        shown = ", ".join(layers[:2]) + (f" (+{len(layers) - 2})" if len(layers) > 2 else "")
        rows.append(
            (
                group["index"],
                group["channels"],
                group["kept"],
                f"{group['kept'] / max(group['channels'], 1):.2f}",
                shown,
            )
        )
    print_table(("GROUP", "CHANNELS", "KEPT", "KEEP", "LAYERS"), rows)
    before = result["unpruned_predicted"]["total_ms"]
    after = result["predicted"]["total_ms"]
    print(
        f"predicted {before:.3f} ms -> {after:.3f} ms ({before / max(after, 1e-9):.2f}x) "
        f"for a budget of {result['budget_ms']:.3f} ms"
    )
    if result.get("measured_ms") is not None:
        met = "met" if result.get("met_budget") else "NOT met"
        print(f"measured {result['measured_ms']:.3f} ms: budget {met}")
    allocation = result.get("allocation")
    if allocation:
        band = ""
        if allocation.get("band_low") is not None:
            band = (
                f"; band {allocation['band_low']:.2f}..{allocation['band_high']:.2f} around "
                f"{allocation['uniform_keep_ratio']:.2f} (max_skew {allocation['max_skew']}, "
                f"min_keep_ratio {allocation['min_keep_ratio']})"
            )
        print(f"keep ratios {allocation['keep_ratio_min']:.2f}..{allocation['keep_ratio_max']:.2f}{band}")
    allocator = result.get("allocator")
    if allocator:
        settings = " ".join(f"{name}={value}" for name, value in allocator.get("environment", {}).items())
        how = f"; run the deployment with {settings}" if settings else ""
        print(f"latencies hold under the allocator policy {allocator['policy']}{how}")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")
