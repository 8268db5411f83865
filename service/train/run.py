"""`lpnet train` as a function: `run_train` takes a `TrainRequest` through the train mode and measures
its result; `write_results` writes what the command leaves in its output directory.

Timings are taken in this process on torch-cpu with one thread, under the request's allocator
policy, each at the speed the machine had when the run started (a speed probe timed around every
sample): a budget taken from the unpruned network and the plans measured later compare on the same
scale even when a shared machine's speed drifts in between.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpnet.arch.ir import Network
from lpnet.gates.chart import layer_latency_chart
from lpnet.gates.supervised import evaluate_accuracy, train_epochs
from lpnet.gates.training import TrainedPlan, TrainPruneConfig, train_and_prune
from lpnet.measurement import MeasuredLatency
from lpnet.predictor.model import LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.train import MIN_NETWORK_SAMPLES, TrainConfig, fit_predictor
from lpnet.pruning import dump_pruned, export_pruned_onnx
from profiler.backends.base import get_backend
from profiler.environment import (
    AllocatorPolicy,
    apply_allocator_policy,
    fresh_mapping_kb,
    last_level_cache_kb,
)
from profiler.protocol import TimingProtocol
from profiler.variants import measure_width_variants
from profiler.verification import NetworkMeter
from service.config import FitSettings
from service.errors import InvalidInput
from service.predictors import fit_configs
from service.train import SMALL_RESNET
from service.train.datasets import DataLoaders, load_dataset
from service.train.model import build_model

logger = logging.getLogger(__name__)

Note = Callable[[str], None]
"""Hears a progress line meant for people (measuring, fitting, training)."""

# Epochs the model is trained before gating when it starts from random weights.
BASE_EPOCHS = 5


@dataclass(frozen=True)
class TrainRequest:
    """One run of the train mode.

    Attributes:
        budget_ms, budget_share: the latency budget in ms, or as a share of the unpruned network's
            latency (measured when `verify` or `fit_variants`, else predicted); exactly one.
        predictor: the latency predictor (a device's, or one from a file); exactly one of it and
            `fit_variants`.
        fit_variants: fit a predictor here on this many measured width variants of the network (what
            a network far from the device's profiled families, like the digits ResNet, needs).
        allocator: the allocator policy timings are taken under (the device's).
        dataset, data, image_size, batch_size: the data (`datasets.load_dataset`; `data` is the folder
            a dataset other than digits is read from).
        model, weights: the module to prune (`model.build_model`).
        base_epochs: training before gating (None: none with `weights`, else `BASE_EPOCHS`).
        verify: measure plans here and re-plan when over budget.
        config: the train mode's settings; its seed also seeds the data split, the variants and the fit.
        fit: the ensemble and steps of the fit on `fit_variants` (the service's `LPNET_FIT__*`).
    """

    budget_ms: float | None = None
    budget_share: float | None = None
    predictor: LatencyPredictor | None = None
    fit_variants: int | None = None
    allocator: AllocatorPolicy = AllocatorPolicy.RETAIN
    dataset: str = "digits"
    data: Path | None = None
    image_size: int | None = None
    batch_size: int = 64
    model: str = SMALL_RESNET
    weights: Path | None = None
    base_epochs: int | None = None
    verify: bool = False
    config: TrainPruneConfig = field(default_factory=TrainPruneConfig)
    fit: FitSettings = field(default_factory=FitSettings)

    def check(self) -> None:
        """Raises InvalidInput for a request that cannot run, before anything is loaded."""
        if (self.budget_ms is None) == (self.budget_share is None):
            raise InvalidInput("give exactly one of budget_ms and budget_share")
        if (self.predictor is None) == (self.fit_variants is None):
            raise InvalidInput("give exactly one of a predictor and fit_variants")
        if self.fit_variants is not None and self.fit_variants < MIN_NETWORK_SAMPLES:
            raise InvalidInput(
                f"fit_variants must be at least {MIN_NETWORK_SAMPLES} (a predictor needs that many "
                f"networks), got {self.fit_variants}",
                {"fit_variants": self.fit_variants},
            )


@dataclass(frozen=True)
class TrainReport:
    """What a train run gives: the train mode's outcome, its budget, and what was measured on the way.

    Attributes:
        network: the unpruned network's IR.
        budget_ms: the budget planned for.
        nominal_probe_ms: the speed probe's time every timing is reported at.
        unpruned_measured_ms: the unpruned network as measured (None: not measured).
        unpruned_predicted_ms: the unpruned network as predicted.
        pruned_measured: the pruned network as measured (None: not verified).
        outcome: the plan, the pruned module and the accuracies.
    """

    network: Network
    budget_ms: float
    nominal_probe_ms: float | None
    unpruned_measured_ms: float | None
    unpruned_predicted_ms: float
    pruned_measured: MeasuredLatency | None
    outcome: TrainedPlan

    def to_dict(self) -> dict[str, Any]:
        """The report as `plan.json` holds it (the plan without the pruned IR)."""
        outcome = self.outcome
        return {
            "budget_ms": self.budget_ms,
            "nominal_probe_ms": self.nominal_probe_ms,
            "unpruned_measured_ms": self.unpruned_measured_ms,
            "unpruned_predicted_ms": self.unpruned_predicted_ms,
            "pruned_measured_ms": self.pruned_measured.ms if self.pruned_measured is not None else None,
            "pruned_measured_raw_ms": self.pruned_measured.raw_ms
            if self.pruned_measured is not None
            else None,
            "accuracy_before": outcome.accuracy_before,
            "accuracy_gated": outcome.accuracy_gated,
            "accuracy_pruned": outcome.accuracy_pruned,
            "accuracy_after": outcome.accuracy_after,
            "gated_counts": outcome.gated_counts,
            "seconds": outcome.seconds,
            "plan": outcome.plan.to_dict(include_network=False),
        }


def run_train(request: TrainRequest, note: Note = logger.info) -> TrainReport:
    """Train W-Gates with the network the request names, prune it to the budget, fine-tune it, and
    measure it when verifying.

    Raises:
        InvalidInput: a request that cannot run (`TrainRequest.check`), a dataset or model that
            cannot be built as asked (`load_dataset`, `build_model`).
        DatasetUnavailable: the dataset's files are missing.
        UnknownModel: no torchvision model of that name.
        BudgetInfeasible, InvalidPlanOptions: see `lpnet.gates.training.train_and_prune`.
    """
    request.check()
    config = request.config
    torch.manual_seed(config.seed)
    data = load_dataset(request.dataset, request.data, request.image_size, request.batch_size, config.seed)
    module, network = build_model(request.model, data, request.weights)
    meter = local_meter(request.allocator)
    note(f"speed probe {meter.nominal_probe_ms:.3f} ms: timings are reported at this speed")
    if request.predictor is not None:
        predictor, measured_unpruned = request.predictor, None
    else:
        assert request.fit_variants is not None  # `check`: one of the two
        predictor, measured_unpruned = fitted_predictor(
            network,
            request.fit_variants,
            meter,
            fit_configs(request.fit, config.seed, last_level_cache_kb(), fresh_mapping_kb()),
            note,
        )
    train_base(module, data, request, note)
    if request.verify:
        measured_unpruned = meter(network).ms
    predicted_unpruned = predictor.predict(network).total_ms
    if request.budget_ms is not None:
        budget_ms = float(request.budget_ms)
    else:
        assert request.budget_share is not None  # `check`: one of the two
        reference = measured_unpruned if measured_unpruned is not None else predicted_unpruned
        budget_ms = request.budget_share * reference
    note(
        f"budget {budget_ms:.3f} ms; unpruned {predicted_unpruned:.3f} ms predicted"
        + (f", {measured_unpruned:.3f} ms measured" if measured_unpruned is not None else "")
    )
    measure = meter if request.verify else None
    outcome = train_and_prune(module, network, predictor, budget_ms, data.train, data.val, config, measure)
    final = meter(outcome.pruned.network) if request.verify else None
    return TrainReport(
        network, budget_ms, meter.nominal_probe_ms, measured_unpruned, predicted_unpruned, final, outcome
    )


def local_meter(allocator: AllocatorPolicy) -> NetworkMeter:
    """A speed-probed meter on torch-cpu with one thread, with this process put under `allocator`."""
    torch.set_num_threads(1)
    apply_allocator_policy(allocator)
    return NetworkMeter.probed(get_backend("torch-cpu", threads=1), TimingProtocol())


def fitted_predictor(
    network: Network,
    variants: int,
    meter: NetworkMeter,
    configs: tuple[LPNetConfig, TrainConfig],
    note: Note,
) -> tuple[LatencyPredictor, float]:
    """LPNet fitted on `variants` width variants of `network` measured here (quick protocol), and the
    unpruned network's measured latency (the first variant)."""
    quick = meter.with_protocol(TimingProtocol.quick())
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 8 == 0:
            note(f"measured {done}/{total} width variants ({time.perf_counter() - started:.0f} s)")

    samples = measure_width_variants(
        network, variants, lambda net: quick(net).ms, seed=configs[1].seed, progress=progress
    )
    predictor = fit_predictor(samples, *configs)
    note(f"fitted LPNet on {len(samples)} measured variants in {time.perf_counter() - started:.0f} s")
    return predictor, samples[0].latency_ms


def train_base(module: nn.Module, data: DataLoaders, request: TrainRequest, note: Note) -> None:
    """Train the unpruned module before gating (`TrainRequest.base_epochs`), at the train mode's
    learning rate."""
    epochs = request.base_epochs
    if epochs is None:
        epochs = 0 if request.weights is not None else BASE_EPOCHS
    if not epochs:
        return
    started = time.perf_counter()
    config = request.config
    train_epochs(module, data.train, epochs, config.learning_rate, max_batches=config.max_batches)
    note(
        f"trained the unpruned model for {epochs} epoch(s): accuracy "
        f"{evaluate_accuracy(module, data.val):.4f} ({time.perf_counter() - started:.0f} s)"
    )


def write_results(report: TrainReport, output: Path, onnx: bool = False) -> None:
    """Write `pruned.safetensors` (weights and pruned architecture; `lpnet.pruning.load_pruned` reads
    it), `plan.json` (`TrainReport.to_dict`) and `layers.png` (per-layer latency before and after)
    into `output`, and `pruned.onnx` with `onnx`."""
    pruned = report.outcome.pruned
    (output / "pruned.safetensors").write_bytes(dump_pruned(pruned))
    (output / "plan.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
    (output / "layers.png").write_bytes(layer_latency_chart(report.outcome.plan))
    if onnx:
        (output / "pruned.onnx").write_bytes(export_pruned_onnx(pruned))
