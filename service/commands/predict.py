"""`lpnet predict`: a network's predicted latency on a device, with its interval and per-layer times."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from service.commands._common import CommandError, database_session, print_table
from service.commands.remote import remote_client, server_arguments
from service.config import Settings

if TYPE_CHECKING:
    from lpnet.arch.ir import Network
    from service.commands._common import SubParsers
    from service.schemas.latency import LatencyRead


def input_shape(text: str) -> tuple[int, int, int, int]:
    """argparse type for N,C,H,W."""
    try:
        values = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four integers like 1,3,224,224, got {text!r}") from None
    if len(values) != 4 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected four positive integers like 1,3,224,224, got {text!r}")
    return values[0], values[1], values[2], values[3]


def register(subparsers: SubParsers) -> None:
    """Add the ``predict`` command."""
    parser = subparsers.add_parser(
        "predict",
        help="predict a network's latency on a device",
        description="Predict latency with the device's newest predictor: total, interval, per layer.",
    )
    parser.add_argument("--device", required=True, help="device name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="a torchvision model name, e.g. resnet50")
    source.add_argument("--json", type=Path, help="a JSON IR file")
    source.add_argument("--onnx", type=Path, help="an ONNX file")
    parser.add_argument(
        "--input-shape", type=input_shape, default=(1, 3, 224, 224), help="N,C,H,W (default: 1,3,224,224)"
    )
    parser.add_argument("--top", type=int, help="show only the N slowest layers")
    server_arguments(parser)
    parser.set_defaults(handler=run_predict)


def load_network(args: argparse.Namespace, batch_size: int = 1) -> Network:
    """The network named on the command line; an ONNX file's symbolic batch is `batch_size`."""
    from lpnet.arch.from_torch import network_from_torchvision
    from lpnet.arch.ir import Network
    from lpnet.arch.onnx_io import network_from_onnx

    if args.json is not None:
        return Network.from_json(args.json.read_bytes())
    if args.onnx is not None:
        return network_from_onnx(args.onnx.read_bytes(), name=args.onnx.stem, batch_size=batch_size)
    if not args.model:
        raise CommandError("name a torchvision model, or give --json FILE or --onnx FILE", 2)
    return network_from_torchvision(args.model, args.input_shape)


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Print the prediction, made here or, with ``--server``, by that server."""
    read = _remote_prediction(args) if args.server else _local_prediction(args, settings)
    print(
        f"{read.network_name or read.network_hash[:12]} on {read.device}: {read.total_ms:.3f} ms "
        f"(interval {read.low_ms:.3f} .. {read.high_ms:.3f} ms; predictor version {read.predictor.version})"
    )
    layers = read.per_layer
    if args.top:
        layers = sorted(layers, key=lambda layer: layer.ms, reverse=True)[: args.top]
    total = read.total_ms or 1.0
    print_table(
        ("LAYER", "OP", "MS", "SHARE"),
        [(layer.name, layer.op, f"{layer.ms:.4f}", f"{100 * layer.ms / total:.1f}%") for layer in layers],
    )
    print(f"overhead not attributed to layers: {read.overhead_ms:.4f} ms")
    for warning in read.warnings:
        print(f"warning: {warning}")
    return 0


def _local_prediction(args: argparse.Namespace, settings: Settings) -> LatencyRead:
    import torch

    from service.devices import get_device
    from service.latency import LatencyService
    from service.predictors import current_predictor

    torch.set_num_threads(settings.torch_threads)
    service = LatencyService.from_settings(settings)
    with database_session(settings) as session:
        device = get_device(session, args.device)
        predictor = current_predictor(session, device)
        network = load_network(args, device.batch_size)
        return service.predict_network(session, device, predictor, network)


def _remote_prediction(args: argparse.Namespace) -> LatencyRead:
    """The server's prediction (a JSON or ONNX file is sent as it is), read into the schema it answered
    with."""
    from service.schemas.latency import LatencyRead

    architecture = args.json or args.onnx or args.model
    if not architecture:
        raise CommandError("name a torchvision model, or give --json FILE or --onnx FILE", 2)
    with remote_client(args) as client:
        answer = client.latency(args.device, architecture, input_shape=args.input_shape)
    return LatencyRead.model_validate(answer.model_dump(mode="json"))
