"""`lpnet train`: W-Gates trained with the network on a dataset, then pruned to a latency budget.

The train mode of the planner (`lpnet.gates.training.train_and_prune`) on the command line:

    lpnet train --dataset digits --model small-resnet --fit-variants 24 --budget-share 0.7 \\
        --verify --output runs/digits

writes `pruned.safetensors` (weights and pruned architecture; `lpnet.pruning.load_pruned` reads it),
`plan.json` (the plan with every verification round and the accuracies) and `layers.png`
(per-layer latency before and after), plus `pruned.onnx` with `--onnx`.

The latency predictor is the device's newest one (`--device NAME`), a predictor file
(`--predictor FILE`), or one fitted here on `--fit-variants N` measured width variants of the network
(what a network far from the device's profiled families, like the digits ResNet, needs). The command
parses its flags into a `service.train.run.TrainRequest`; `service.train.run` does the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lpnet.gates.options import (
    ALLOCATION,
    FINETUNE_EPOCHS,
    GATE_EPOCHS,
    MAX_BATCHES,
    MAX_SKEW,
    ROUND_TO,
    SEED,
    TRAIN_LEARNING_RATE,
)
from service.commands._common import (
    CommandError,
    database_session,
    info,
    non_negative_int,
    option_argument,
    positive_float,
    positive_int,
    share,
)
from service.config import Settings
from service.train import DATASETS, SMALL_RESNET

if TYPE_CHECKING:
    from lpnet.predictor.predict import LatencyPredictor
    from profiler.environment import AllocatorPolicy
    from service.commands._common import SubParsers
    from service.train.run import TrainReport, TrainRequest

# The train mode's options `lpnet train` sets, each a flag of the same name.
TRAIN_OPTIONS = (
    ALLOCATION,
    MAX_SKEW,
    GATE_EPOCHS,
    FINETUNE_EPOCHS,
    TRAIN_LEARNING_RATE,
    ROUND_TO,
    MAX_BATCHES,
    SEED,
)


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
        help="measure this many width variants of the network here (torch-cpu, 1 thread) and fit on them "
        "(ensemble and steps: LPNET_FIT__MEMBERS, LPNET_FIT__STEPS)",
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
    for spec in TRAIN_OPTIONS:
        option_argument(training, spec)
    parser.add_argument("--output", type=Path, required=True, help="directory for the results")
    parser.add_argument("--onnx", action="store_true", help="also export pruned.onnx")
    parser.set_defaults(handler=run_train_command)


def run_train_command(args: argparse.Namespace, settings: Settings) -> int:
    """Train, prune, fine-tune, write the results and print a summary."""
    from service.errors import InvalidInput
    from service.train.run import run_train, write_results

    request = train_request(args, settings)
    try:
        request.check()
        make_output(args.output)
        report = run_train(request, note=info)
    except InvalidInput as exc:
        raise CommandError(exc.message, 2) from exc
    write_results(report, args.output, onnx=args.onnx)
    print_summary(report, args.output)
    return 0


def make_output(output: Path) -> None:
    """Create the output directory before anything long runs."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create --output {output}: {exc}", 2) from exc


def train_request(args: argparse.Namespace, settings: Settings) -> TrainRequest:
    """The request the flags describe, with the predictor of `--device` or `--predictor` loaded."""
    from lpnet.gates.training import TrainPruneConfig
    from service.train.run import TrainRequest

    predictor, allocator = predictor_and_policy(args, settings)
    config = TrainPruneConfig(**{spec.name: getattr(args, spec.name) for spec in TRAIN_OPTIONS})
    return TrainRequest(
        budget_ms=args.budget_ms,
        budget_share=args.budget_share,
        predictor=predictor,
        fit_variants=args.fit_variants,
        allocator=allocator,
        dataset=args.dataset,
        data=args.data,
        image_size=args.image_size,
        batch_size=args.batch_size,
        model=args.model,
        weights=args.weights,
        base_epochs=args.base_epochs,
        verify=args.verify,
        config=config,
        fit=settings.fit,
    )


def predictor_and_policy(
    args: argparse.Namespace, settings: Settings
) -> tuple[LatencyPredictor | None, AllocatorPolicy]:
    """The predictor of `--device` or `--predictor` (None with `--fit-variants`), and the allocator
    policy timings are taken under: the device's with `--device`, else retain."""
    from lpnet.predictor.artifact import load_predictor
    from profiler.environment import AllocatorPolicy

    if args.predictor is not None:
        try:
            data = args.predictor.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read --predictor {args.predictor}: {exc}", 2) from exc
        return load_predictor(data), AllocatorPolicy.RETAIN
    if args.device is None:
        return None, AllocatorPolicy.RETAIN
    from service.devices import get_device
    from service.predictors import current_predictor, load_predictor_artifact

    with database_session(settings) as session:
        device = get_device(session, args.device)
        predictor = load_predictor_artifact(session, current_predictor(session, device).id)
        return predictor, AllocatorPolicy(device.allocator)


def print_summary(report: TrainReport, output: Path) -> None:
    """Accuracy before and after, predicted (and measured) latency against the budget, the widths."""
    outcome, plan = report.outcome, report.outcome.plan
    measured = report.pruned_measured.ms if report.pruned_measured is not None else None
    print(
        f"pruned {report.network.name}: accuracy {outcome.accuracy_before:.4f} -> {outcome.accuracy_after:.4f}; "
        f"predicted {plan.predicted.total_ms:.3f} ms for a {report.budget_ms:.3f} ms budget"
        + (f", measured {measured:.3f} ms" if measured is not None else "")
    )
    print(f"widths {plan.widths}")
    print(f"results in {output}")
