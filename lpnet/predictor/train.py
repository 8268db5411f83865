"""Fitting LPNet on measured networks: joint network- and layer-level loss in log space."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lpnet.arch.ir import Op
from lpnet.errors import LpnetError
from lpnet.predictor.features import OP_CLASS, OP_INDEX, OPS
from lpnet.predictor.model import LPNet, LPNetConfig
from lpnet.predictor.predict import LatencyPredictor, TrainingDomain
from lpnet.predictor.samples import NetworkSample, PackedSamples, pack_samples

logger = logging.getLogger(__name__)

MIN_NETWORK_SAMPLES = 20
# Intervals are calibrated on held-out networks to cover this share of them.
INTERVAL_COVERAGE = 0.9


class NotEnoughMeasurements(LpnetError):
    """Too few measured networks to fit a predictor."""

    code = "not_enough_measurements"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    steps: int = 1500
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    layer_loss_weight: float = 0.5
    calibration_share: float = 0.15
    huber_delta: float = 0.1
    batch_networks: int = 64
    seed: int = 0


ProgressCallback = Callable[[int, int], None]


def _check_enough(samples: Sequence[NetworkSample]) -> None:
    if len(samples) < MIN_NETWORK_SAMPLES:
        missing = MIN_NETWORK_SAMPLES - len(samples)
        raise NotEnoughMeasurements(
            f"fitting needs at least {MIN_NETWORK_SAMPLES} measured networks; got {len(samples)}, "
            f"measure {missing} more (lpnet profile)",
            {"have": len(samples), "need": MIN_NETWORK_SAMPLES, "missing": missing},
        )


def _fit_packed(
    packed: PackedSamples, config: LPNetConfig, train: TrainConfig, progress: ProgressCallback | None
) -> LPNet:
    generator = torch.Generator().manual_seed(train.seed)
    order = torch.randperm(packed.num_networks, generator=generator).tolist()
    n_cal = max(3, int(round(train.calibration_share * packed.num_networks)))
    calibration, fitting = order[:n_cal], order[n_cal:]

    torch.manual_seed(train.seed)  # initial weights: a fit is reproducible from its data
    model = LPNet(config)
    model.feature_mean.copy_(packed.features.mean(0))
    model.feature_std.copy_(packed.features.std(0).clamp_min(1e-3))
    layer_targets = packed.layer_target_ms[~torch.isnan(packed.layer_target_ms)]
    smallest = float(layer_targets.min()) if layer_targets.numel() else 1e-4
    largest = float(packed.network_target_ms.max())
    model.layer_log_ms_bounds.copy_(
        torch.tensor([math.log(max(smallest, 1e-6)) - 2.0, math.log(largest) + 1.0])
    )
    fit_part = packed.subset(fitting)
    total_steps = train.steps * config.members
    for k in range(config.members):
        boot = torch.randint(0, fit_part.num_networks, (fit_part.num_networks,), generator=generator)
        member_data = fit_part.subset(boot.tolist()) if config.members > 1 else fit_part

        def member_progress(step: int, k: int = k) -> None:
            if progress is not None:
                progress(k * train.steps + step, total_steps)

        _fit_member(model, k, member_data, train, seed=train.seed * 1000 + k, progress=member_progress)
    _fill_unseen_ops(model, {OPS[i] for i in packed.ops.unique().tolist()})
    _calibrate_interval(model, packed.subset(calibration))
    model.eval()
    return model


def _fill_unseen_ops(model: LPNet, seen: set[Op]) -> None:
    """Give every op training never saw the mean embedding and overhead of the seen ops of its class.

    Their own rows never received a gradient: left as initialised they would predict noise.
    """
    with torch.no_grad():
        for op in OPS:
            if op in seen:
                continue
            peers = [OP_INDEX[o] for o in OPS if o in seen and OP_CLASS[o] == OP_CLASS[op]]
            if not peers:
                continue
            for member in model.members:
                member.embed.weight[OP_INDEX[op]] = member.embed.weight[peers].mean(0)
                member.node_overhead[OP_INDEX[op]] = member.node_overhead[peers].mean()


def _fit_member(
    model: LPNet,
    index: int,
    data: PackedSamples,
    train: TrainConfig,
    seed: int,
    progress: Callable[[int], None] | None,
) -> None:
    torch.manual_seed(seed)
    member = model.members[index]
    features = model.normalise(data.features)
    log_net = torch.log(data.network_target_ms)
    log_layer = torch.log(data.layer_target_ms.clamp_min(1e-4))  # NaN where a layer was not timed
    counts = torch.bincount(data.segment, minlength=data.num_networks)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    with torch.no_grad():  # start the overhead at zero and the layers at the mean per-layer share
        member.network_overhead.zero_()
        member.head.bias.fill_(math.log(float((data.network_target_ms / counts).mean())))
    optimizer = torch.optim.AdamW(
        member.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.steps)
    batch_size = min(train.batch_networks, data.num_networks)
    for step in range(train.steps):
        # A minibatch of whole networks (all their layers), so the network loss stays exact.
        chosen = torch.randperm(data.num_networks)[:batch_size]
        rows = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in chosen.tolist()])
        segment = torch.repeat_interleave(torch.arange(batch_size), counts[chosen])
        ops = data.ops[rows]
        layer_log = member.layer_log_ms(features[rows], ops)  # (R,)
        per_layer = torch.exp(layer_log) + member.overhead_ms(ops)
        network = torch.zeros(batch_size).index_add(0, segment, per_layer) + member.network_overhead
        # Huber in log space: a measurement disturbed by a load spike must not steer the fit.
        loss = _robust(torch.log(network.clamp_min(1e-4)) - log_net[chosen], train.huber_delta)
        timed = ~torch.isnan(log_layer[rows])
        if bool(timed.any()):
            layer_error = layer_log[timed] - log_layer[rows][timed]
            loss = loss + train.layer_loss_weight * _robust(layer_error, train.huber_delta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and step % 50 == 0:
            progress(step)
    logger.debug("member %d final loss %.5f", index, float(loss.detach()))


def _robust(log_error: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.nn.functional.huber_loss(log_error, torch.zeros_like(log_error), delta=delta) / delta


def _calibrate_interval(model: LPNet, data: PackedSamples) -> None:
    with torch.no_grad():
        member_ms = network_predictions(model, data)  # (K, S)
        log_members = torch.log(member_ms.clamp_min(1e-4))
        center = torch.log(member_ms.mean(0).clamp_min(1e-4))
        spread = (
            log_members.std(0).clamp_min(1e-3) if model.config.members > 1 else torch.full_like(center, 0.01)
        )
        z = (torch.log(data.network_target_ms) - center).abs() / spread
        model.interval_scale.fill_(float(torch.quantile(z, INTERVAL_COVERAGE)))


def network_predictions(model: LPNet, data: PackedSamples) -> torch.Tensor:
    """Network latency (ms) of every member for packed samples: (K, S)."""
    features = model.normalise(data.features)
    rows = []
    for member in model.members:
        per_layer = torch.exp(member.layer_log_ms(features, data.ops)) + member.overhead_ms(data.ops)
        rows.append(
            torch.zeros(data.num_networks).index_add(0, data.segment, per_layer) + member.network_overhead
        )
    return torch.stack(rows)


def fit_predictor(
    samples: Sequence[NetworkSample],
    config: LPNetConfig | None = None,
    train: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
) -> LatencyPredictor:
    """Fit an LPNet ensemble, calibrate its interval on held-out networks, and record its training
    domain (ops seen, feature ranges) for extrapolation warnings.

    Raises:
        NotEnoughMeasurements: with fewer than MIN_NETWORK_SAMPLES measured networks, saying how
            many more are needed.
    """
    _check_enough(samples)
    packed = pack_samples(samples)
    model = _fit_packed(packed, config or LPNetConfig(), train or TrainConfig(), progress)
    domain = TrainingDomain(
        ops={OPS[i].value for i in packed.ops.unique().tolist()},
        feature_min=packed.features.min(0).values,
        feature_max=packed.features.max(0).values,
    )
    return LatencyPredictor(model, domain)
