"""Fitting LPNet on measured networks: joint network- and layer-level loss in log space."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lpnet.arch.ir import Op
from lpnet.errors import LpnetError
from lpnet.predictor.features import (
    CONV_KINDS,
    OP_CLASS,
    OPS,
    OWN_WORK_TERMS,
    RATE_KINDS,
    WEIGHTS_TERM,
    kind_ranges,
    rate_kinds,
    work_terms,
)
from lpnet.predictor.model import (
    BASE_TERMS,
    INITIAL_LOG_CACHE,
    LayerLatencyMLP,
    LPNet,
    LPNetConfig,
    cold_share,
    spill_share,
    spills,
)
from lpnet.predictor.predict import MIN_SPILLED_LAYERS, LatencyPredictor, TrainingDomain
from lpnet.predictor.samples import NetworkSample, PackedSamples, pack_samples

logger = logging.getLogger(__name__)

MIN_NETWORK_SAMPLES = 20


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
    calibration_share: float = 0.15  # held out to calibrate the interval of a one-member fit
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
    packed: PackedSamples,
    groups: Sequence[str],
    config: LPNetConfig,
    train: TrainConfig,
    progress: ProgressCallback | None,
) -> tuple[LPNet, list[list[int]], torch.Tensor]:
    """Fit the members cross-validated and calibrate the interval on what each member never saw;
    returns the model, the networks each member never saw and every member's latency of every
    network, (K, S).

    With K >= 2 members the networks are split into K folds (`fold_split`) and member k is fitted on
    every fold but k: every network takes part in the fit, and every network is left out of exactly
    one member, whose error on it calibrates the interval (`LPNet.interval_bounds`). With one member,
    `train.calibration_share` of the networks is held out of its fit to calibrate.
    """
    generator = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)  # initial weights: a fit is reproducible from its data
    model = LPNet(config)
    model.feature_mean.copy_(packed.features.mean(0))
    model.feature_std.copy_(packed.features.std(0).clamp_min(1e-3))
    low, high = kind_feature_ranges(packed.features, rate_kinds(packed.ops, packed.features))
    model.feature_low.copy_(low)
    model.feature_high.copy_(high)
    if config.members >= 2:
        folds = fold_split(groups, config.members, generator)
        left_out = [[i for i, f in enumerate(folds) if f == k] for k in range(config.members)]
    else:
        left_out = [_calibration_networks(groups, train.calibration_share, generator)]
    total_steps = train.steps * config.members
    for k, out in enumerate(left_out):
        member_data = packed.subset(sorted(set(range(packed.num_networks)) - set(out)))

        def member_progress(step: int, k: int = k) -> None:
            if progress is not None:
                progress(k * train.steps + step, total_steps)

        _fit_member(model, k, member_data, train, seed=train.seed * 1000 + k, progress=member_progress)
    with torch.no_grad():
        predictions = network_predictions(model, packed)
    _calibrate_interval(model, predictions, packed.network_target_ms, left_out, groups)
    model.eval()
    return model, left_out, predictions


def fold_split(groups: Sequence[str], folds: int, generator: torch.Generator) -> list[int]:
    """Each network's fold, 0 to `folds` - 1, folds as even in size as the groups allow.

    Small groups (one generated architecture, a family with few variants) go whole into one fold, so
    the member that leaves the fold out never saw their architecture, as it never sees a user's. A
    large group (a family's many width variants) is spread over the folds network by network, so
    every member keeps most of the family.
    """
    sizes, small = _small_groups(groups)
    load = [0] * folds
    fold_of: dict[str, int] = {}
    for i in torch.randperm(len(small), generator=generator).tolist():
        fold_of[small[i]] = load.index(min(load))
        load[fold_of[small[i]]] += sizes[small[i]]
    out = [fold_of.get(g, -1) for g in groups]
    rest = [i for i, g in enumerate(groups) if g not in fold_of]
    for j in torch.randperm(len(rest), generator=generator).tolist():
        out[rest[j]] = load.index(min(load))
        load[out[rest[j]]] += 1
    return out


def kind_feature_ranges(features: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest raw feature over the rows of each rate kind, (R, F) each, for rows
    (N, F) of kinds (N,). A kind without rows gets the range of all rows."""
    low, high = kind_ranges(features, kinds)
    absent = torch.bincount(kinds, minlength=len(RATE_KINDS)) == 0
    low[absent] = features.min(0).values
    high[absent] = features.max(0).values
    return low, high


def _small_groups(groups: Sequence[str]) -> tuple[Counter[str], list[str]]:
    """How many networks each group has, and the groups small enough to leave out whole (one
    generated architecture, a family with a few variants: at most a twentieth of the networks),
    sorted."""
    sizes = Counter(groups)
    small_limit = max(1, len(groups) // 20)
    return sizes, sorted(g for g, size in sizes.items() if size <= small_limit)


def _calibration_networks(groups: Sequence[str], share: float, generator: torch.Generator) -> list[int]:
    """Networks held out of a one-member fit to calibrate its interval.

    Small groups are held out whole, so the interval is calibrated on architectures the fit never
    saw, as users' networks are. A large group (a family's many width variants) is never held out
    whole, which would take the family from the fit; when small groups do not reach `share`, single
    networks of large groups make up the rest.
    """
    want = max(3, int(round(share * len(groups))))
    sizes, small = _small_groups(groups)
    held: set[str] = set()
    count = 0
    for i in torch.randperm(len(small), generator=generator).tolist():
        if count >= want:
            break
        held.add(small[i])
        count += sizes[small[i]]
    calibration = [i for i, g in enumerate(groups) if g in held]
    if len(calibration) < want:
        rest = [i for i, g in enumerate(groups) if g not in held]
        order = torch.randperm(len(rest), generator=generator).tolist()
        calibration += sorted(rest[j] for j in order[: want - len(calibration)])
    return calibration


def initial_log_rates(data: PackedSamples, log_spill_weights: float) -> torch.Tensor:
    """log (ms per MAC, ms per element moved, ms per call, ms per cold call, ms per weight past the
    spill point) of every rate kind, (len(RATE_KINDS), BASE_TERMS).

    A non-negative least-squares fit: one set of rates for every layer from whole-network times (each
    network's time against its summed MACs, elements, layer count, cold shares at the initial
    cache size and spilled weights at `log_spill_weights`), then per rate kind from its in-context
    layer times where at least `_MIN_OP_ROWS` layers were timed. A price per spilled weight is fitted
    only where at least `MIN_SPILLED_LAYERS` networks (or in-context layers of the kind) spilled; elsewhere
    it is zero: nothing measured says what spilling costs there (`LatencyPredictor` warns).
    """
    terms = work_terms(data.features)
    work = torch.exp(terms[:, :OWN_WORK_TERMS]).double()  # (N, 2)
    cold = torch.exp(cold_share(terms[:, OWN_WORK_TERMS], torch.tensor(INITIAL_LOG_CACHE))).double()
    calls = torch.ones(work.shape[0], 1, dtype=torch.float64)
    share = torch.exp(spill_share(terms[:, WEIGHTS_TERM], log_spill_weights)).double()
    spilled = torch.exp(terms[:, WEIGHTS_TERM]).double() * share
    spilled_layer = spills(terms[:, WEIGHTS_TERM], log_spill_weights)
    design = torch.cat([work, calls, cold[:, None], spilled[:, None]], dim=1)  # (N, BASE_TERMS)
    per_network = torch.zeros(data.num_networks, BASE_TERMS, dtype=torch.float64)
    per_network = per_network.index_add(0, data.segment, design)
    spilling_networks = int(data.segment[spilled_layer].unique().numel())
    overall = _non_negative_fit(per_network, data.network_target_ms.double(), spilling_networks)
    rates = overall.expand(len(RATE_KINDS), BASE_TERMS).clone()
    timed = ~torch.isnan(data.layer_target_ms)
    kinds = rate_kinds(data.ops, data.features)
    for index in kinds[timed].unique().tolist():
        rows = timed & (kinds == index)
        if int(rows.sum()) >= _MIN_OP_ROWS:
            spilled_rows = int((spilled_layer & rows).sum())
            rates[index] = _non_negative_fit(design[rows], data.layer_target_ms[rows].double(), spilled_rows)
    return torch.log(rates.clamp_min(1e-12)).float()


_MIN_OP_ROWS = 8


def _non_negative_fit(design: torch.Tensor, target: torch.Tensor, spilled_rows: int) -> torch.Tensor:
    """Non-negative coefficients of `target ~ design` in relative error (each row weighted 1/target);
    the last column's (weights past the spill point) is zero unless `spilled_rows` >= `MIN_SPILLED_LAYERS`."""
    # Imported here: scikit-learn costs a second to import, and a process that only predicts never fits.
    from sklearn.linear_model import LinearRegression

    columns = design.shape[1] if spilled_rows >= MIN_SPILLED_LAYERS else design.shape[1] - 1
    fitted = design[:, :columns]
    weight = 1.0 / target.clamp_min(1e-6)
    scale = fitted.abs().amax(0).clamp_min(1e-12)
    fit = LinearRegression(positive=True, fit_intercept=False)
    fit.fit((fitted / scale * weight[:, None]).numpy(), (target * weight).numpy())
    coef = torch.zeros(design.shape[1], dtype=torch.float64)
    coef[:columns] = torch.as_tensor(fit.coef_, dtype=torch.float64) / scale
    if float(coef.sum()) <= 0:  # degenerate data: everything per call
        coef = torch.zeros(design.shape[1], dtype=torch.float64)
        coef[2] = float(target.mean() / design[:, 2].mean())
    return coef


def _rate_kind_class(kind: str) -> str:
    """The class of a rate kind: a convolution's kernel kinds are convolutions, an op's is its class."""
    return OP_CLASS[Op.CONV2D] if kind in CONV_KINDS else OP_CLASS.get(Op(kind), "")


@dataclass(frozen=True)
class PeerTies:
    """Ops and rate kinds whose parameters are the mean of their class peers', and those peers.

    Tied rows (an op's embedding, a rate kind's rates) are never fitted on their own: their few
    measurements would fit whatever the residuals of the networks they occur in are (one GELU timed
    in context beside four networks containing GELUs put 0.2 ms on a GELU that takes 0.025 ms).
    """

    ops: dict[int, list[int]]
    kinds: dict[int, list[int]]

    @classmethod
    def of(cls, data: PackedSamples) -> PeerTies:
        """An op or kind with fewer than `_MIN_OP_ROWS` layers timed in context is tied to the ops or
        kinds of its class that have at least that many; one never seen at all, failing those, to the
        seen ones of its class. Without such peers a row keeps its own parameters (the rates fitted
        to every layer, `initial_log_rates`, for a rate kind)."""
        timed = ~torch.isnan(data.layer_target_ms)
        kinds = rate_kinds(data.ops, data.features)
        op_rows = torch.bincount(data.ops[timed], minlength=len(OPS)).tolist()
        kind_rows = torch.bincount(kinds[timed], minlength=len(RATE_KINDS)).tolist()
        seen_ops = set(data.ops.unique().tolist())
        seen_kinds = set(kinds.unique().tolist())

        def ties(
            names: list[str], rows: list[int], seen: set[int], klass: Callable[[str], str]
        ) -> dict[int, list[int]]:
            out: dict[int, list[int]] = {}
            for index, name in enumerate(names):
                if rows[index] >= _MIN_OP_ROWS:
                    continue
                same = [i for i in range(len(names)) if i != index and klass(names[i]) == klass(name)]
                peers = [i for i in same if rows[i] >= _MIN_OP_ROWS]
                if not peers and index not in seen:
                    peers = [i for i in same if i in seen]
                if peers:
                    out[index] = peers
            return out

        return cls(
            ops=ties([op.value for op in OPS], op_rows, seen_ops, lambda op: OP_CLASS.get(Op(op), "")),
            kinds=ties(list(RATE_KINDS), kind_rows, seen_kinds, _rate_kind_class),
        )

    def apply(self, member: LayerLatencyMLP) -> None:
        """Set every tied row of `member` to its peers' mean (rates: the mean of the rates, not of
        their logs, so that a rate fitted to zero does not cancel its peer's)."""
        with torch.no_grad():
            for index, peers in self.ops.items():
                member.embed.weight[index] = member.embed.weight[peers].mean(0)
            for index, peers in self.kinds.items():
                member.log_rates[index] = torch.logsumexp(member.log_rates[peers], 0) - math.log(len(peers))


def _fit_member(
    model: LPNet,
    index: int,
    data: PackedSamples,
    train: TrainConfig,
    seed: int,
    progress: Callable[[int], None] | None,
) -> None:
    """Fit member `index` on `data`, from rates fitted to `data` (`initial_log_rates`)."""
    torch.manual_seed(seed)
    member = model.members[index]
    ties = PeerTies.of(data)
    with torch.no_grad():
        member.log_rates.copy_(initial_log_rates(data, model.config.log_spill_weights))
        ties.apply(member)
    kinds = rate_kinds(data.ops, data.features)
    features = model.normalise(data.features, kinds)
    work = work_terms(data.features)
    log_net = torch.log(data.network_target_ms)
    log_layer = torch.log(data.layer_target_ms.clamp_min(1e-4))  # NaN where a layer was not timed
    counts = torch.bincount(data.segment, minlength=data.num_networks)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
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
        layer_log = member.layer_log_ms(features[rows], work[rows], ops, kinds[rows])  # (R,)
        per_layer = torch.exp(layer_log)
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
        ties.apply(member)
        schedule.step()
        if progress and step % 50 == 0:
            progress(step)
    logger.debug("member %d final loss %.5f", index, float(loss.detach()))


def _robust(log_error: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.nn.functional.huber_loss(log_error, torch.zeros_like(log_error), delta=delta) / delta


def _calibrate_interval(
    model: LPNet,
    predictions: torch.Tensor,
    target_ms: torch.Tensor,
    left_out: Sequence[Sequence[int]],
    groups: Sequence[str],
) -> None:
    """Set the residuals of `LPNet.interval_bounds`: the absolute log error of every network of
    `_calibration_order` under the member that never saw it (members' latencies (K, S))."""
    log_error = (predictions.clamp_min(1e-4).log() - target_ms.log()).abs()
    member_of = {i: k for k, out in enumerate(left_out) for i in out}
    calibration = _calibration_order(left_out, groups)
    residuals = [float(log_error[member_of[i], i]) for i in calibration]
    members = [member_of[i] for i in calibration]
    model.set_interval_residuals(torch.tensor(residuals), torch.tensor(members, dtype=torch.long))


def _calibration_order(left_out: Sequence[Sequence[int]], groups: Sequence[str]) -> list[int]:
    """The networks that calibrate the interval, member by member.

    A user's network is an architecture the predictor never saw. So when at least
    `_MIN_UNSEEN_CALIBRATION` left-out networks are of architectures their member never saw in any
    width, only those calibrate; a fit of one family's width variants (train mode) calibrates on the
    variants left out.
    """
    everything: list[int] = []
    unseen: list[int] = []
    for out in left_out:
        fitted = {groups[i] for i in set(range(len(groups))) - set(out)}
        everything += out
        unseen += [i for i in out if groups[i] not in fitted]
    return unseen if len(unseen) >= _MIN_UNSEEN_CALIBRATION else everything


_MIN_UNSEEN_CALIBRATION = 20


def network_predictions(model: LPNet, data: PackedSamples) -> torch.Tensor:
    """Network latency (ms) of every member for packed samples: (K, S)."""
    kinds = rate_kinds(data.ops, data.features)
    features = model.normalise(data.features, kinds)
    work = work_terms(data.features)
    rows = []
    for member in model.members:
        layer_ms = torch.exp(member.layer_log_ms(features, work, data.ops, kinds))
        rows.append(
            torch.zeros(data.num_networks).index_add(0, data.segment, layer_ms) + member.network_overhead
        )
    return torch.stack(rows)


@dataclass(frozen=True)
class CrossFit:
    """A fitted predictor, and every network some member never saw with that member's latency.

    `held_out[j]` was left out of member `held_out_member[j]`'s fit, which predicts it at
    `held_out_ms[j]`: a prediction of a network the predicting model never saw, for every network
    of a cross-fitted ensemble, without a fit of its own. `calibration` lists the networks whose
    errors calibrate the interval, in the order of `LPNet.interval_residuals`.
    """

    predictor: LatencyPredictor
    held_out: list[int]
    held_out_member: list[int]
    held_out_ms: list[float]
    calibration: list[int]


def fit_cross_validated(
    samples: Sequence[NetworkSample],
    config: LPNetConfig | None = None,
    train: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
) -> CrossFit:
    """Fit an LPNet ensemble, calibrate its interval on the networks each member never saw, and
    record its training domain (ops seen, feature ranges) for extrapolation warnings.

    Raises:
        NotEnoughMeasurements: with fewer than MIN_NETWORK_SAMPLES measured networks, saying how
            many more are needed.
    """
    _check_enough(samples)
    packed = pack_samples(samples)
    groups = [sample.group for sample in samples]
    model, left_out, predictions = _fit_packed(
        packed, groups, config or LPNetConfig(), train or TrainConfig(), progress
    )
    held = sorted((i, k) for k, out in enumerate(left_out) for i in out)
    return CrossFit(
        predictor=LatencyPredictor(
            model,
            TrainingDomain.of(
                packed.ops,
                packed.features,
                ~torch.isnan(packed.layer_target_ms),
                model.config.log_spill_weights,
            ),
        ),
        held_out=[i for i, _ in held],
        held_out_member=[k for _, k in held],
        held_out_ms=[float(predictions[k, i]) for i, k in held],
        calibration=_calibration_order(left_out, groups),
    )


def fit_predictor(
    samples: Sequence[NetworkSample],
    config: LPNetConfig | None = None,
    train: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
) -> LatencyPredictor:
    """`fit_cross_validated`'s predictor."""
    return fit_cross_validated(samples, config, train, progress).predictor
