"""LPNet fitted on real measurements of two tiny network families (timed here, 1 thread)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Network, Op
from lpnet.predictor.artifact import (
    ARTIFACT_VERSION,
    ArtifactError,
    dump_predictor,
    load_predictor,
    read_header,
)
from lpnet.predictor.baselines import FlopsLinear
from lpnet.predictor.features import (
    OP_INDEX,
    RATE_KIND_INDEX,
    RATE_KINDS,
    layer_rate_kind,
    rate_kinds,
    tensorize,
    work_terms,
)
from lpnet.predictor.metrics import accuracy_metrics
from lpnet.predictor.model import CORRECTION_FACTOR, LPNetConfig
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample, merge_replicates, pack_samples
from lpnet.predictor.train import NotEnoughMeasurements, TrainConfig, fit_predictor, initial_log_rates
from profiler.backends import get_backend
from profiler.measure import measure_in_context
from profiler.protocol import TimingProtocol
from profiler.speed import SpeedProbe, scale_to_nominal

pytestmark = pytest.mark.slow

SHAPE = (1, 3, 48, 48)
VARIANTS_PER_FAMILY = 26
SMALL_FIT = TrainConfig(steps=500)
SMALL_MODEL = LPNetConfig(members=3)


def _plain() -> Network:
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    return network_from_module(module, SHAPE, name="plain", family="plain")


def _separable() -> Network:
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 96, 1), nn.BatchNorm2d(96), nn.ReLU6(),
        nn.Conv2d(96, 96, 3, stride=2, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU6(),
        nn.Conv2d(96, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    return network_from_module(module, SHAPE, name="separable", family="separable")


def _variants(network: Network, count: int, seed: int) -> list[list[int]]:
    layout = channel_layout(network)
    rng = np.random.default_rng(seed)
    vectors = [layout.full_widths]
    for _ in range(count - 1):
        ratios = rng.uniform(0.1, 1.0, len(layout.groups))
        vectors.append([max(1, round(g.channels * r)) for g, r in zip(layout.groups, ratios, strict=True)])
    return vectors


@pytest.fixture(scope="module")
def measured() -> list[NetworkSample]:
    """In-context measurements against the speed probe, at the median probe speed of the set.

    This machine's own speed moves by tens of percent within a minute; the probe takes that out of
    the labels, as a profile with the probe does. Every variant is timed in two rounds a few seconds
    apart and keeps the faster one relative to the probe: another process can only slow a timing
    down, and one burst during a round once left both models at 14 % MAPE, unable to rank.
    """
    torch.set_num_threads(1)
    backend = get_backend("torch-cpu", threads=1)
    protocol = TimingProtocol.quick()
    probe = SpeedProbe()
    variants = [
        (base, widths)
        for seed, base in enumerate([_plain(), _separable()])
        for widths in _variants(base, VARIANTS_PER_FAMILY, seed)
    ]
    rounds = [
        [
            measure_in_context(base, backend, protocol, width_vector=widths, probe=probe.run)
            for base, widths in variants
        ]
        for _ in range(2)
    ]
    timed = []
    for (base, widths), *results in zip(variants, *rounds, strict=True):
        assert all(r.network.relative is not None for r in results)
        timed.append((base, widths, min(results, key=lambda r: r.network.relative or 0.0)))
    nominal = float(np.median([r.network.probe_ms for _, _, r in timed]))
    samples = []
    for base, widths, result in timed:
        assert result.network.relative is not None and result.network.probe_ms is not None
        latency, layers = scale_to_nominal(
            result.network.relative, result.network.probe_ms, result.layers_ms, nominal
        )
        samples.append(NetworkSample(apply_width_vector(base, widths), latency, layers, base.family))
    return samples


@pytest.fixture(scope="module")
def split(measured: list[NetworkSample]) -> tuple[list[NetworkSample], list[NetworkSample]]:
    # Every fourth variant of each family is held out: whole architectures, never rows.
    train = [s for i, s in enumerate(measured) if i % 4 != 3]
    test = [s for i, s in enumerate(measured) if i % 4 == 3]
    return train, test


@pytest.fixture(scope="module")
def predictor(split: tuple[list[NetworkSample], list[NetworkSample]]) -> LatencyPredictor:
    return fit_predictor(split[0], SMALL_MODEL, SMALL_FIT)


def test_lpnet_beats_the_flops_linear_baseline_on_held_out_networks(
    predictor: LatencyPredictor, split: tuple[list[NetworkSample], list[NetworkSample]]
) -> None:
    train, test = split
    measured_ms = np.array([s.latency_ms for s in test])
    lpnet_ms = np.array([predictor.predict(s.network).total_ms for s in test])
    baseline = FlopsLinear()
    baseline.fit(train)
    baseline_ms = baseline.predict([s.network for s in test])
    lpnet = accuracy_metrics(lpnet_ms, measured_ms)
    flops = accuracy_metrics(baseline_ms, measured_ms)
    assert lpnet.mape < flops.mape, (lpnet, flops)
    assert lpnet.spearman > 0.5


def test_gradients_with_respect_to_channel_counts_are_finite_and_positive(
    predictor: LatencyPredictor,
) -> None:
    tn = tensorize(_plain())
    # Every group scaled by t from 0.3 to 0.9 of its width: the derivative along that path, on a grid
    # fine enough (under half a channel a step) that its mean integrates the learned staircase.
    shares = torch.linspace(0.3, 0.9, 121)
    widths = (shares[:, None] * tn.full_widths[None]).clone().requires_grad_(True)
    latency = predictor.latency(tn, widths)
    latency.sum().backward()
    grad = widths.grad
    assert grad is not None and torch.isfinite(grad).all()
    along_path = (grad * tn.full_widths[None]).sum(dim=1)
    # More channels, more latency, for a conv-dominated network. At a single point a group may sit
    # on a flat step of the latency staircase, where a small negative slope is no error; over the
    # path the slope is positive and agrees with the finite difference it integrates to.
    assert float(along_path.mean()) > 0
    difference = float((latency[-1] - latency[0]).detach()) / float(shares[-1] - shares[0])
    assert difference > 0
    assert 0.5 < float(along_path.mean()) / difference < 2.0


@pytest.mark.parametrize("block_rows", [4096, 7])  # one block of corrections, and many
def test_batch_path_equals_single_predictions(
    predictor: LatencyPredictor, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deduplicating fast path, whatever the number of rows.
    monkeypatch.setattr("lpnet.predictor.model._GENERAL_PATH_ROWS", 0)
    monkeypatch.setattr("lpnet.predictor.model._CORRECTION_BLOCK_ROWS", block_rows)
    base = _separable()
    tn = tensorize(base)
    vectors = torch.tensor(_variants(base, 400, seed=7), dtype=torch.float32)
    batch = predictor.predict_widths(tn, vectors)
    for i in (0, 57, 399):
        single = predictor.predict(apply_width_vector(base, vectors[i].long().tolist()))
        assert batch.total_ms[i].item() == pytest.approx(single.total_ms, rel=1e-4)
        assert batch.low_ms[i] <= batch.total_ms[i] <= batch.high_ms[i]


def test_per_layer_predictions_sum_with_overhead_to_the_total(predictor: LatencyPredictor) -> None:
    prediction = predictor.predict(_plain())
    assert sum(layer.ms for layer in prediction.per_layer) + prediction.overhead_ms == pytest.approx(
        prediction.total_ms, rel=1e-4
    )
    assert prediction.low_ms <= prediction.total_ms <= prediction.high_ms
    assert [layer.name for layer in prediction.per_layer] == [layer.name for layer in _plain().layers]


def test_artifact_round_trips(predictor: LatencyPredictor) -> None:
    data = dump_predictor(predictor, {"metrics": {"note": "x"}})
    loaded = load_predictor(data)
    network = _separable()
    assert loaded.predict(network).total_ms == predictor.predict(network).total_ms
    assert json.loads(read_header(data)["extra"]) == {"metrics": {"note": "x"}}
    assert b"pickle" not in data[:64]


def test_artifact_from_an_unknown_version_fails_with_a_version_message(predictor: LatencyPredictor) -> None:
    data = dump_predictor(predictor)
    current = f'"artifact_version":"{ARTIFACT_VERSION}"'.encode()
    assert current in data
    newer = data.replace(current, b'"artifact_version":"9"', 1)  # same length
    with pytest.raises(ArtifactError, match="version 9 cannot be read by this lpnet"):
        load_predictor(newer)
    with pytest.raises(ArtifactError, match="truncated"):
        load_predictor(data[:4])


def test_unseen_op_and_out_of_range_configurations_are_flagged(predictor: LatencyPredictor) -> None:
    class SqueezeExcite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Conv2d(32, 32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(self.fc(self.pool(y)))

    prediction = predictor.predict(network_from_module(SqueezeExcite(), SHAPE))
    assert prediction.extrapolated
    assert any("'sigmoid' was never measured" in w for w in prediction.warnings)
    assert any("'mul' was never measured" in w for w in prediction.warnings)
    huge = network_from_module(nn.Sequential(nn.Conv2d(3, 2048, 7, padding=3)), (1, 3, 224, 224))
    assert any("outside the training range" in w for w in predictor.predict(huge).warnings)
    assert not predictor.predict(_plain()).warnings


def test_layers_far_beyond_the_work_of_their_kind_in_training_are_flagged(
    predictor: LatencyPredictor,
) -> None:
    # Every feature of this depthwise convolution lies inside the global training range (96 channels
    # and a 48x48 map were both measured), but it does 3x the MACs of any depthwise layer training
    # had: only the per-kind work range sees that.
    def depthwise(channels: int, side: int) -> Network:
        module = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels))
        return network_from_module(module, (1, channels, side, side), name=f"dw{channels}")

    beyond = predictor.predict(depthwise(96, 48)).warnings
    assert not any("outside the training range" in w for w in beyond)
    flagged = [w for w in beyond if "conv2d_depthwise" in w]
    assert len(flagged) == 1 and "more work than any measured" in flagged[0]
    factor = float(flagged[0].split(": ")[1].split("x")[0])
    assert 2.5 < factor < 4.0  # 96 channels at 48x48 against 32 at 48x48 or 96 at 24x24
    assert not any("conv2d_depthwise" in w for w in predictor.predict(depthwise(32, 48)).warnings)
    assert predictor.domain.work_min is not None
    assert predictor.domain.work_max is not None
    dense = RATE_KIND_INDEX["conv2d"]
    assert bool((predictor.domain.work_min[dense] <= predictor.domain.work_max[dense]).all())


def test_layers_past_their_kinds_work_that_take_little_of_the_time_are_not_flagged(
    predictor: LatencyPredictor,
) -> None:
    # A 100-way classifier does 10x the MACs of the 10-way ones training had, but next to the
    # convolutions it takes under 5 % of the time: the work warning stays quiet. On its own it is
    # the whole time, and named.
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100),
    )  # fmt: skip
    prediction = predictor.predict(network_from_module(module, SHAPE))
    head = next(layer.ms for layer in prediction.per_layer if layer.op == "linear")
    assert head < 0.05 * prediction.total_ms
    assert not any("linear layer" in w for w in prediction.warnings)
    alone = network_from_module(nn.Sequential(nn.Flatten(), nn.Linear(64, 100)), (1, 64, 1, 1))
    assert any("1 linear layer(s)" in w and "10.0x the MACs" in w for w in predictor.predict(alone).warnings)


def test_a_layer_beyond_its_kinds_training_range_is_corrected_as_at_its_edge(
    predictor: LatencyPredictor,
) -> None:
    # Training's linear layers all read 64 features, while its convolutions had up to 96 channels.
    # A linear layer reading 80 or 96 lies inside the range of all layers but beyond that of linear
    # ones: the correction sees it held at the linear edge, as if it read 64.
    def linear_features(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        network = network_from_module(nn.Sequential(nn.Flatten(), nn.Linear(width, 10)), (1, width, 1, 1))
        tn = tensorize(network, with_groups=False)
        features = tn.layer_features(torch.zeros(1, 0))[0]  # (L, F)
        row = tn.ops.tolist().index(OP_INDEX[Op.LINEAR])
        return features[row], rate_kinds(tn.ops, features)[row]

    model = predictor.model
    edge = model.normalise(*linear_features(64))
    for width in (80, 96):
        features, kind = linear_features(width)
        assert float(features[0]) <= float(model.feature_high.max(0).values[0])  # log in-channels
        assert torch.allclose(model.normalise(features, kind), edge, atol=1e-4)
    assert not torch.allclose(model.normalise(*linear_features(48)), edge, atol=1e-4)


def test_a_convolution_kind_training_never_had_is_flagged(predictor: LatencyPredictor) -> None:
    grouped = network_from_module(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4)), (1, 32, 24, 24))
    warnings = predictor.predict(grouped).warnings
    assert any(w.startswith("no conv2d_grouped layer was measured") for w in warnings)
    assert not any("'conv2d' was never measured" in w for w in warnings)


def test_a_version_4_artifact_loads_with_one_feature_range_and_no_work_ranges(
    predictor: LatencyPredictor,
) -> None:
    # Version 4 stored one feature range for all layers and no per-kind work ranges.
    data = dump_predictor(predictor)
    header = read_header(data)
    tensors = load_tensors(data)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("domain.work_")}
    tensors["model.feature_low"] = tensors["model.feature_low"].min(0).values
    tensors["model.feature_high"] = tensors["model.feature_high"].max(0).values
    old = load_predictor(save_tensors(tensors, metadata={**header, "artifact_version": "4"}))
    assert old.domain.work_min is None and old.model.feature_low.shape == predictor.model.feature_low.shape
    grouped = network_from_module(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4)), (1, 32, 24, 24))
    assert old.predict(grouped).total_ms == pytest.approx(predictor.predict(grouped).total_ms, rel=0.5)
    assert not any("conv2d_grouped" in w for w in old.predict(grouped).warnings)
    current = load_predictor(data)
    assert current.predict(grouped).warnings == predictor.predict(grouped).warnings
    assert current.predict(grouped).total_ms == predictor.predict(grouped).total_ms


def test_too_few_measurements_say_how_many_more(measured: list[NetworkSample]) -> None:
    with pytest.raises(NotEnoughMeasurements, match="measure 15 more"):
        fit_predictor(measured[:5], SMALL_MODEL, SMALL_FIT)


def test_an_unseen_activation_is_predicted_like_the_activations_training_saw(
    predictor: LatencyPredictor,
) -> None:
    # Training saw relu and relu6, never tanh: tanh gets their mean embedding, not the
    # untrained row it was initialised with. Likewise grouped convolutions, which neither family has,
    # get the mean rates of the convolution kinds training saw (dense, pointwise, depthwise).
    tanh, relu, relu6 = OP_INDEX[Op.TANH], OP_INDEX[Op.RELU], OP_INDEX[Op.RELU6]
    seen_convs = [RATE_KIND_INDEX[k] for k in ("conv2d", "conv2d_pointwise", "conv2d_depthwise")]
    for member in predictor.model.members:
        mean = (member.embed.weight[relu] + member.embed.weight[relu6]) / 2
        assert torch.allclose(member.embed.weight[tanh].detach(), mean.detach())
        rates = torch.exp(member.log_rates.detach())
        grouped = rates[RATE_KIND_INDEX["conv2d_grouped"]]
        assert torch.allclose(grouped, rates[seen_convs].mean(0), rtol=1e-4)

    def net(activation: type[nn.Module]) -> Network:
        module = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), activation(), nn.Conv2d(32, 32, 3, padding=1))
        return network_from_module(module, SHAPE, name="act")

    unseen = predictor.predict(net(nn.Tanh))
    assert any("'tanh' was never measured" in w for w in unseen.warnings)
    seen_ms = [
        next(layer.ms for layer in predictor.predict(net(a)).per_layer if layer.op in ("relu", "relu6"))
        for a in (nn.ReLU, nn.ReLU6)
    ]
    tanh_ms = next(layer.ms for layer in unseen.per_layer if layer.op == "tanh")
    assert 0.5 * min(seen_ms) < tanh_ms < 2.0 * max(seen_ms)


def test_merge_replicates_labels_each_architecture_with_the_median_of_its_timings(
    resnet18_ir: Network,
) -> None:
    full = channel_layout(resnet18_ir).full_widths
    narrow = apply_width_vector(resnet18_ir, [max(1, w // 2) for w in full])
    first, second = resnet18_ir.layers[0].name, resnet18_ir.layers[1].name
    samples = [
        NetworkSample(narrow, 4.0, {first: 1.0}, family=None),
        NetworkSample(resnet18_ir, 10.0, None, family="resnet18"),
        NetworkSample(narrow, 7.0, {first: 3.0, second: 2.0}, family="resnet18"),
        NetworkSample(narrow, 5.0, None),
    ]
    merged = merge_replicates(samples)
    assert [m.network.content_hash for m in merged] == [narrow.content_hash, resnet18_ir.content_hash]
    assert merged[0].latency_ms == 5.0  # median of 4, 7 and 5
    # Each layer's time is the median of the timings that measured it.
    assert merged[0].per_layer_ms == {first: 2.0, second: 2.0}
    assert merged[0].family == "resnet18"
    assert merged[1] is samples[1]
    assert merge_replicates(merged) == merged


def test_far_outside_training_the_prediction_scales_with_the_work(predictor: LatencyPredictor) -> None:
    # 64x the area of any map training saw: an unconstrained network on log features may answer
    # anything there; the work-over-throughput base with its bounded correction grows with the work.
    def conv_at(side: int) -> Network:
        module = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
        return network_from_module(module, (1, 64, side, side), name=f"conv{side}")

    small, large = predictor.predict(conv_at(48)), predictor.predict(conv_at(384))
    factor = CORRECTION_FACTOR**2
    assert 64 / factor < large.total_ms / small.total_ms < 64 * factor
    assert any("outside the training range" in w for w in large.warnings)
    # Beyond the training range the correction holds its value on the edge: two maps both past it
    # differ by the base alone, which is linear in the work (4x the area, 4x the time).
    larger = predictor.predict(conv_at(768))
    assert larger.per_layer[0].ms / large.per_layer[0].ms == pytest.approx(4.0, rel=0.02)


def test_convolutions_get_rates_by_kernel_kind_that_no_width_changes() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),  # dense
        nn.Conv2d(32, 64, 1),  # pointwise
        nn.Conv2d(64, 64, 3, padding=1, groups=8),  # grouped
        nn.Conv2d(64, 64, 5, padding=2, groups=64),  # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    network = network_from_module(module, (1, 3, 16, 16), name="kinds")
    tn = tensorize(network)
    full = torch.tensor([channel_layout(network).full_widths], dtype=torch.float32)
    kinds = rate_kinds(tn.ops, tn.layer_features(torch.cat([full, (full * 0.5).round()])))
    names = [[RATE_KINDS[int(k)] for k in row] for row in kinds]
    assert names[0][:4] == ["conv2d", "conv2d_pointwise", "conv2d_grouped", "conv2d_depthwise"]
    assert names[0][4:] == ["adaptive_avgpool2d", "flatten", "linear"]
    assert names[1] == names[0]
    assert [layer_rate_kind(layer) for layer in network.layers] == names[0]


def test_initial_rates_recover_a_known_cost_model() -> None:
    # Layers whose times follow an exact work-over-throughput law: the non-negative fit finds its
    # rates from the layer times, and a zero rate stays (near) zero.
    widths = [8, 16, 24, 32, 48, 64, 96, 128]
    samples = []
    for index, (c_in, c_out) in enumerate(zip(widths, reversed(widths), strict=True)):
        module = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_in, 1))
        network = network_from_module(module, (1, c_in, 32, 32), name=f"law{index}")
        tn = tensorize(network, with_groups=False)
        work = torch.exp(work_terms(tn.layer_features(torch.zeros(1, 0))[0]))  # (L, 2)
        per_layer = {name: float(2e-7 * w[0] + 0.01) for name, w in zip(tn.layer_names, work, strict=True)}
        samples.append(NetworkSample(network, sum(per_layer.values()), per_layer))
    # The 3x3 and the 1x1 convolutions are fitted apart (rate kinds), both to the same law.
    rates = torch.exp(initial_log_rates(pack_samples(samples), LPNetConfig().log_spill_weights))
    for kind in ("conv2d", "conv2d_pointwise"):
        fitted = rates[RATE_KIND_INDEX[kind]]
        assert float(fitted[0]) == pytest.approx(2e-7, rel=0.05)
        assert float(fitted[1]) < 1e-9
        assert float(fitted[2]) == pytest.approx(0.01, rel=0.05)
