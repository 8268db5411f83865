"""`lpnet train`: W-Gates trained with the network on a dataset, then pruned to a latency budget.

The train mode of the planner (`lpnet.gates.training.train_and_prune`) on the command line:

    lpnet train --dataset digits --model small-resnet --fit-variants 24 --budget-share 0.7 \\
        --verify --output runs/digits

writes `pruned.safetensors` (weights and pruned architecture; `lpnet.pruning.load_pruned` reads it),
`plan.json` (the plan with every verification round and the accuracies) and `layers.png`
(per-layer latency before and after), plus `pruned.onnx` with `--onnx`.

The latency predictor is the device's newest one (`--device NAME`), a predictor file
(`--predictor FILE`), or one fitted here on `--fit-variants N` measured width variants of the network
(what a network far from the device's profiled families, like the digits ResNet, needs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.commands._common import (
    CommandError,
    at_least_one,
    database_session,
    info,
    non_negative_int,
    positive_float,
    positive_int,
    share,
)
from service.config import Settings

if TYPE_CHECKING:
    from torch import nn

    from lpnet.arch.ir import Network
    from lpnet.gates.datasets import DataLoaders
    from lpnet.predictor.predict import LatencyPredictor
    from profiler.environment import AllocatorPolicy
    from service.commands._common import SubParsers

SMALL_RESNET = "small-resnet"
DATASETS = ("digits", "imagefolder", "cifar10")


def register(subparsers: SubParsers) -> None:
    """Add the ``train`` command."""
    parser = subparsers.add_parser(
        "train",
        help="train W-Gates with a network on data, prune it to a latency budget, fine-tune it",
        description=(
            "The planner's train mode: joint training of the network and its W-Gates under a latency "
            "budget, physical pruning, fine-tuning. Writes the pruned model, the plan and a chart."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="(default: digits)")
    data.add_argument(
        "--data", type=Path, help="the ImageFolder root or the folder holding cifar-10-batches-py"
    )
    data.add_argument("--image-size", type=positive_int, help="input side (digits: 16, imagefolder: 224)")
    data.add_argument("--batch-size", type=positive_int, default=64)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=SMALL_RESNET, help=f"{SMALL_RESNET} (default) or a torchvision model name"
    )
    model.add_argument("--weights", type=Path, help="starting weights: the model's state dict as safetensors")
    model.add_argument(
        "--base-epochs",
        type=non_negative_int,
        help="train before gating (default: 0 with --weights, else 5)",
    )
    latency = parser.add_argument_group("latency")
    source = latency.add_mutually_exclusive_group(required=True)
    source.add_argument("--device", help="use this device's newest predictor")
    source.add_argument("--predictor", type=Path, help="a predictor artifact (safetensors from the service)")
    source.add_argument(
        "--fit-variants",
        type=positive_int,
        help="measure this many width variants of the network here (torch-cpu, 1 thread) and fit on them",
    )
    budget = latency.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=positive_float, help="latency budget in ms")
    budget.add_argument(
        "--budget-share",
        type=share,
        help="budget as a share of the unpruned latency (measured with --verify or --fit-variants, else predicted)",
    )
    latency.add_argument(
        "--verify", action="store_true", help="measure plans here and re-plan when over budget"
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--allocation",
        choices=("planned", "joint"),
        default="planned",
        help="group counts from the architecture-only plan (default) or learnt by the gates",
    )
    training.add_argument(
        "--max-skew",
        type=at_least_one,
        help="planned keep ratios within this factor of the uniform one (default: the library's, 1.25)",
    )
    training.add_argument("--gate-epochs", type=positive_int, default=5)
    training.add_argument("--finetune-epochs", type=non_negative_int, default=5)
    training.add_argument("--learning-rate", type=positive_float, default=0.05)
    training.add_argument(
        "--round-to", type=positive_int, default=8, help="kept counts are multiples of this"
    )
    training.add_argument("--max-batches", type=positive_int, help="at most this many batches per epoch")
    training.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="directory for the results")
    parser.add_argument("--onnx", action="store_true", help="also export pruned.onnx")
    parser.set_defaults(handler=run_train)


def load_data(args: argparse.Namespace) -> DataLoaders:
    """The dataset named on the command line."""
    from lpnet.gates.datasets import cifar10_loaders, digits_loaders, image_folder_loaders

    if args.dataset == "digits":
        return digits_loaders(batch_size=args.batch_size, image_size=args.image_size or 16, seed=args.seed)
    if args.data is None:
        raise CommandError(f"--dataset {args.dataset} needs --data PATH", 2)
    if args.dataset == "imagefolder":
        return image_folder_loaders(
            args.data, image_size=args.image_size or 224, batch_size=args.batch_size, seed=args.seed
        )
    if args.image_size not in (None, 32):
        raise CommandError("CIFAR-10 images are 32x32; drop --image-size", 2)
    return cifar10_loaders(args.data, batch_size=args.batch_size, seed=args.seed)


def build_model(args: argparse.Namespace, data: DataLoaders) -> tuple[nn.Module, Network]:
    """The module to prune and its IR; weights from `--weights` when given."""
    from lpnet.arch.from_torch import network_from_module, torchvision_model
    from lpnet.gates.smallnet import SmallResNet, SmallResNetConfig

    channels = data.input_chw[0]
    if args.model == SMALL_RESNET:
        module: nn.Module = SmallResNet(SmallResNetConfig(in_channels=channels, num_classes=data.num_classes))
    else:
        if channels != 3:
            raise CommandError(
                f"torchvision models take 3-channel images, {args.dataset} has {channels}; "
                f"use --model {SMALL_RESNET}",
                2,
            )
        module = torchvision_model(args.model, num_classes=data.num_classes)
    if args.weights is not None:
        load_weights(module, args.weights)
    network = network_from_module(module, (1, *data.input_chw), name=args.model, family=args.model)
    return module, network


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a state dict saved as safetensors (never a pickle) into `module`, all keys matching."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CommandError(f"cannot read {path} as safetensors: {exc}", 2) from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise CommandError(f"{path} does not fit --model {module.__class__.__name__} ({'; '.join(parts)})", 2)
    module.load_state_dict(state)


def allocator_policy(args: argparse.Namespace, settings: Settings) -> AllocatorPolicy:
    """The allocator policy timings here are taken under: the device's with --device, else retain."""
    from profiler.environment import AllocatorPolicy

    if args.device is None:
        return AllocatorPolicy.RETAIN
    from service.devices import get_device

    with database_session(settings) as session:
        return AllocatorPolicy(get_device(session, args.device).allocator)


def get_predictor(
    args: argparse.Namespace, settings: Settings, network: Network, measure: Any
) -> tuple[LatencyPredictor, float | None]:
    """The predictor, and the network's measured unpruned latency when it was measured here."""
    from lpnet.predictor.artifact import load_predictor
    from lpnet.predictor.train import TrainConfig, fit_predictor
    from profiler.variants import measure_width_variants

    if args.predictor is not None:
        try:
            data = args.predictor.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read --predictor {args.predictor}: {exc}", 2) from exc
        return load_predictor(data), None
    if args.device is not None:
        from service.devices import get_device
        from service.predictors import current_predictor, load_predictor_artifact

        with database_session(settings) as session:
            device = get_device(session, args.device)
            return load_predictor_artifact(session, current_predictor(session, device).id), None
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 8 == 0:
            info(f"measured {done}/{total} width variants ({time.perf_counter() - started:.0f} s)")

    samples = measure_width_variants(network, args.fit_variants, measure, seed=args.seed, progress=progress)
    predictor = fit_predictor(samples, train=TrainConfig(seed=args.seed))
    info(f"fitted LPNet on {len(samples)} measured variants in {time.perf_counter() - started:.0f} s")
    return predictor, samples[0].latency_ms


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train, prune, fine-tune, write the results."""
    import torch

    from lpnet.gates.chart import layer_latency_chart
    from lpnet.gates.training import TrainPruneConfig, evaluate_accuracy, train_and_prune, train_epochs
    from lpnet.predictor.train import MIN_NETWORK_SAMPLES
    from lpnet.pruning import dump_pruned, export_pruned_onnx
    from profiler.backends.base import get_backend
    from profiler.environment import apply_allocator_policy
    from profiler.protocol import TimingProtocol
    from profiler.verification import NetworkMeter

    if args.fit_variants is not None and args.fit_variants < MIN_NETWORK_SAMPLES:
        raise CommandError(
            f"--fit-variants must be at least {MIN_NETWORK_SAMPLES} (a predictor needs that many networks)", 2
        )
    torch.manual_seed(args.seed)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create --output {args.output}: {exc}", 2) from exc
    data = load_data(args)
    module, network = build_model(args, data)

    # Measured here on torch-cpu with one thread, under the device's allocator policy (retain without one).
    torch.set_num_threads(1)
    apply_allocator_policy(allocator_policy(args, settings))
    backend = get_backend("torch-cpu", threads=1)

    # Every timing here is at the speed the machine had when the run started (a speed probe timed
    # around each sample), so a budget taken from the unpruned network and the plans measured later
    # compare on the same scale even when a shared machine's speed drifts in between.
    measure = NetworkMeter.probed(backend, TimingProtocol())
    quick = measure.with_protocol(TimingProtocol.quick())
    info(f"speed probe {measure.nominal_probe_ms:.3f} ms: timings are reported at this speed")

    def quick_measure(net: Network) -> float:
        return quick(net).ms

    predictor, measured_unpruned = get_predictor(args, settings, network, quick_measure)
    base_epochs = args.base_epochs if args.base_epochs is not None else (0 if args.weights else 5)
    if base_epochs:
        started = time.perf_counter()
        train_epochs(module, data.train, base_epochs, args.learning_rate, max_batches=args.max_batches)
        info(
            f"trained the unpruned model for {base_epochs} epoch(s): accuracy "
            f"{evaluate_accuracy(module, data.val):.4f} ({time.perf_counter() - started:.0f} s)"
        )
    if args.verify:
        measured_unpruned = measure(network).ms
    predicted_unpruned = predictor.predict(network).total_ms
    if args.budget_ms is not None:
        budget_ms = float(args.budget_ms)
    else:
        reference = measured_unpruned if measured_unpruned is not None else predicted_unpruned
        budget_ms = args.budget_share * reference
    info(
        f"budget {budget_ms:.3f} ms; unpruned {predicted_unpruned:.3f} ms predicted"
        + (f", {measured_unpruned:.3f} ms measured" if measured_unpruned is not None else "")
    )
    config = TrainPruneConfig(
        allocation=args.allocation,
        **({} if args.max_skew is None else {"max_skew": args.max_skew}),
        gate_epochs=args.gate_epochs,
        finetune_epochs=args.finetune_epochs,
        learning_rate=args.learning_rate,
        round_to=args.round_to,
        max_batches=args.max_batches,
        seed=args.seed,
    )
    outcome = train_and_prune(
        module,
        network,
        predictor,
        budget_ms,
        data.train,
        data.val,
        config,
        measure=measure if args.verify else None,
    )
    final = measure(outcome.pruned.network) if args.verify else None
    final_ms = final.ms if final is not None else None
    report: dict[str, Any] = {
        "budget_ms": budget_ms,
        "nominal_probe_ms": measure.nominal_probe_ms,
        "unpruned_measured_ms": measured_unpruned,
        "unpruned_predicted_ms": predicted_unpruned,
        "pruned_measured_ms": final_ms,
        "pruned_measured_raw_ms": final.raw_ms if final is not None else None,
        "accuracy_before": outcome.accuracy_before,
        "accuracy_gated": outcome.accuracy_gated,
        "accuracy_pruned": outcome.accuracy_pruned,
        "accuracy_after": outcome.accuracy_after,
        "gated_counts": outcome.gated_counts,
        "seconds": outcome.seconds,
        "plan": outcome.plan.to_dict(include_network=False),
    }
    (args.output / "pruned.safetensors").write_bytes(dump_pruned(outcome.pruned))
    (args.output / "plan.json").write_text(json.dumps(report, indent=2, default=float))
    (args.output / "layers.png").write_bytes(layer_latency_chart(outcome.plan))
    if args.onnx:
        (args.output / "pruned.onnx").write_bytes(export_pruned_onnx(outcome.pruned))
    plan = outcome.plan
    print(
        f"pruned {network.name}: accuracy {outcome.accuracy_before:.4f} -> {outcome.accuracy_after:.4f}; "
        f"predicted {plan.predicted.total_ms:.3f} ms for a {budget_ms:.3f} ms budget"
        + (f", measured {final_ms:.3f} ms" if final_ms is not None else "")
    )
    print(f"widths {plan.widths}")
    print(f"results in {args.output}")
    return 0
