"""The price per weight past the spill point: a layer whose weights no longer fit in the device's
last-level cache, or pass the block size past which its allocator maps every allocation afresh, pays for
each of them, once a profile has timed such layers; until then its kind is warned of."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.generator import PROFILING_FAMILY
from lpnet.arch.ir import Network
from lpnet.predictor.artifact import dump_predictor, load_predictor, read_header
from lpnet.predictor.features import RATE_KIND_INDEX, WEIGHTS_TERM, tensorize, work_terms
from lpnet.predictor.model import LPNetConfig, spill_share, spills
from lpnet.predictor.predict import LatencyPredictor
from lpnet.predictor.samples import NetworkSample, pack_samples
from lpnet.predictor.train import TrainConfig, fit_predictor, initial_log_rates

# A 64 KiB cache: a dense 3x3 convolution spills past 1.05 * 16,384 weights, about 45 channels a side.
CACHE_KB = 64
CONFIG = LPNetConfig(members=3, hidden=8, last_level_cache_kb=CACHE_KB)
FIT = TrainConfig(steps=60, batch_networks=8)
PER_MAC, PER_ELEMENT, PER_CALL, PER_SPILLED_WEIGHT = 3e-7, 1e-6, 0.005, 4e-5


def _network(dense: int, pointwise: int, name: str) -> Network:
    module = nn.Sequential(
        nn.Conv2d(8, dense, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(dense, dense, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(dense, pointwise, 1, bias=False),
        nn.Flatten(),
        nn.Linear(pointwise * 64, 10),
    )
    return network_from_module(module, (1, 8, 8, 8), name=name, family=PROFILING_FAMILY)


def _law(network: Network, config: LPNetConfig, noise: np.random.Generator | None = None) -> NetworkSample:
    """Layer times of a work law in which a layer past the cache pays `PER_SPILLED_WEIGHT` per weight."""
    tn = tensorize(network, with_groups=False)
    work = work_terms(tn.layer_features(torch.zeros(1, 0))[0])
    weights = torch.exp(work[:, WEIGHTS_TERM])
    spilled = weights * torch.exp(spill_share(work[:, WEIGHTS_TERM], config.log_spill_weights))
    times = PER_MAC * torch.exp(work[:, 0]) + PER_ELEMENT * torch.exp(work[:, 1]) + PER_CALL
    times = times + PER_SPILLED_WEIGHT * spilled
    jitter = noise.normal(0, 0.03, len(times)) if noise is not None else np.zeros(len(times))
    per_layer = {
        name: float(t) * math.exp(float(j)) for name, t, j in zip(tn.layer_names, times, jitter, strict=True)
    }
    return NetworkSample(network, sum(per_layer.values()), per_layer, PROFILING_FAMILY)


def _samples(count: int, seed: int) -> list[NetworkSample]:
    """Networks whose dense convolutions range from far below the cache to four times past it; their
    1x1 convolutions and linear heads stay below it."""
    rng = np.random.default_rng(seed)
    return [
        _law(_network(int(rng.integers(8, 96)), 16, f"spill-{seed}-{index}"), CONFIG, rng)
        for index in range(count)
    ]


def test_the_initial_rates_find_the_price_of_a_spilled_weight_where_layers_spilled() -> None:
    rates = torch.exp(initial_log_rates(pack_samples(_samples(30, seed=0)), CONFIG.log_spill_weights))
    assert float(rates[RATE_KIND_INDEX["conv2d"], 4]) == pytest.approx(PER_SPILLED_WEIGHT, rel=0.15)
    # No 1x1 convolution spilled: nothing says what spilling costs it.
    assert float(rates[RATE_KIND_INDEX["conv2d_pointwise"], 4]) < 1e-11


def test_without_a_known_cache_no_layer_is_priced_as_spilling() -> None:
    unknown = LPNetConfig()
    assert unknown.last_level_cache_kb is None
    huge = torch.tensor([math.log(4e9)])  # 16 GB of weights
    assert float(torch.exp(spill_share(huge, unknown.log_spill_weights))) == 0.0
    rates = initial_log_rates(pack_samples(_samples(30, seed=0)), unknown.log_spill_weights)
    assert float(rates[:, 4].max()) < math.log(1e-11)


def test_a_fit_that_knows_the_cache_prices_unseen_spilled_networks_closer() -> None:
    samples = _samples(30, seed=1)
    knows = fit_predictor(samples, CONFIG, FIT)
    blind = fit_predictor(samples, LPNetConfig(members=3, hidden=8), FIT)
    rng = np.random.default_rng(7)
    errors: dict[str, list[float]] = {"knows": [], "blind": []}
    for index in range(6):
        sample = _law(_network(int(rng.integers(60, 96)), 16, f"unseen-{index}"), CONFIG)
        for name, predictor in (("knows", knows), ("blind", blind)):
            errors[name].append(abs(math.log(predictor.predict(sample.network).total_ms / sample.latency_ms)))
    assert max(errors["knows"]) < 0.15
    assert sum(errors["knows"]) < 0.5 * sum(errors["blind"])


@pytest.fixture(scope="module")
def spill_predictor() -> LatencyPredictor:
    return fit_predictor(_samples(30, seed=2), CONFIG, FIT)


def test_a_spilled_layer_of_a_kind_that_never_spilled_in_training_is_warned(
    spill_predictor: LatencyPredictor,
) -> None:
    wide_pointwise = _network(16, 4096, "wide-pointwise")  # a 1x1 convolution of 65,536 weights
    warnings = spill_predictor.predict(wide_pointwise).warnings
    spill = [w for w in warnings if "last-level cache" in w]
    assert len(spill) == 1 and spill[0].startswith("1 conv2d_pointwise layer(s)")
    assert "hold up to 256 KB of weights, more than this device's 64 KB last-level cache" in spill[0]
    # Dense convolutions spilled in training: a spilled dense one is priced, not warned of.
    dense = spill_predictor.predict(_network(80, 16, "wide-dense"))
    assert not any("last-level cache" in w for w in dense.warnings)
    # A linear layer at batch 1 reads each weight once wherever it lives: no spill warning, though no
    # linear layer spilled in training either.
    head = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 512))
    linear = spill_predictor.predict(network_from_module(head, (1, 8, 8, 8), name="wide-linear"))
    assert float(spill_predictor.model.members[0].log_rates[RATE_KIND_INDEX["linear"], 4]) < -20
    assert not any("last-level cache" in w for w in linear.warnings)


def test_the_domain_records_the_kinds_that_spilled_in_training_and_warnings_follow_it(
    spill_predictor: LatencyPredictor,
) -> None:
    # Only the dense convolutions of `_samples` reach past the cache.
    assert spill_predictor.domain.spilled_kinds == frozenset({"conv2d"})
    loaded = load_predictor(dump_predictor(spill_predictor))
    assert loaded.domain.spilled_kinds == frozenset({"conv2d"})
    # The record decides, not the fitted price: a priced kind the record lacks is warned of.
    dense = _network(80, 16, "recorded")
    assert not any("last-level cache" in w for w in spill_predictor.predict(dense).warnings)
    unrecorded = LatencyPredictor(
        spill_predictor.model, dataclasses.replace(spill_predictor.domain, spilled_kinds=frozenset())
    )
    spill = [w for w in unrecorded.predict(dense).warnings if "last-level cache" in w]
    assert len(spill) == 1 and spill[0].startswith("1 conv2d layer(s)")
    # Wide 1x1 convolutions in training: their kind is recorded, and a wide one is not warned of.
    rng = np.random.default_rng(5)
    wide = [_law(_network(16, int(rng.integers(1200, 3000)), f"wide-{i}"), CONFIG, rng) for i in range(8)]
    both = fit_predictor([*_samples(22, seed=2), *wide], CONFIG, FIT)
    assert both.domain.spilled_kinds is not None
    assert {"conv2d", "conv2d_pointwise"} <= both.domain.spilled_kinds
    query = _network(16, 4096, "wide-pointwise")
    assert not any("last-level cache" in w for w in both.predict(query).warnings)
    # Timed only as whole networks, they price no kind of their own: not recorded, and warned of.
    whole = [NetworkSample(sample.network, sample.latency_ms, None, PROFILING_FAMILY) for sample in wide]
    unseen = fit_predictor([*_samples(22, seed=2), *whole], CONFIG, FIT)
    assert unseen.domain.spilled_kinds == frozenset({"conv2d"})
    assert any("last-level cache" in w for w in unseen.predict(query).warnings)


def test_a_predictor_stored_without_its_spilled_kinds_goes_by_the_fitted_prices(
    spill_predictor: LatencyPredictor,
) -> None:
    data = dump_predictor(spill_predictor)
    header = read_header(data)
    del header["domain_spilled_kinds"]
    old = load_predictor(save_tensors(load_tensors(data), metadata=header))
    assert old.domain.spilled_kinds is None
    assert not any("last-level cache" in w for w in old.predict(_network(80, 16, "priced")).warnings)
    assert any("last-level cache" in w for w in old.predict(_network(16, 4096, "unpriced")).warnings)


def test_widths_across_the_spill_point_keep_finite_gradients_of_the_right_sign(
    spill_predictor: LatencyPredictor,
) -> None:
    tn = tensorize(_network(96, 16, "gradients"))
    for width in (40.0, 44.0, 46.0, 50.0, 90.0):
        widths = tn.full_widths.clone()
        widths[widths == 96] = width
        widths.requires_grad_(True)
        spill_predictor.latency(tn, widths[None]).sum().backward()
        assert widths.grad is not None and bool(torch.isfinite(widths.grad).all())
        assert float(widths.grad[tn.full_widths == 96].sum()) > 0
    # Past the spill point the layer costs more than its work alone: the price jumps across it.
    below = float(spill_predictor.predict(_network(40, 16, "below")).total_ms)
    above = float(spill_predictor.predict(_network(52, 16, "above")).total_ms)
    assert above > 1.5 * below


def test_the_cache_and_the_spill_price_survive_the_artifact(spill_predictor: LatencyPredictor) -> None:
    data = dump_predictor(spill_predictor)
    loaded = load_predictor(data)
    assert loaded.model.config.last_level_cache_kb == CACHE_KB
    network = _network(80, 16, "round-trip")
    assert loaded.predict(network).total_ms == spill_predictor.predict(network).total_ms


def test_a_version_6_artifact_loads_with_no_price_for_spilled_weights(
    spill_predictor: LatencyPredictor,
) -> None:
    # Version 6 had four base rates per rate kind and no cache in its config.
    data = dump_predictor(spill_predictor)
    header = read_header(data)
    config = {
        k: v for k, v in LPNetConfig(members=3, hidden=8).to_dict().items() if k != "last_level_cache_kb"
    }
    tensors = {
        k: v[:, :4].contiguous() if k.endswith("log_rates") else v for k, v in load_tensors(data).items()
    }
    old = load_predictor(
        save_tensors(tensors, metadata={**header, "artifact_version": "6", "config": json.dumps(config)})
    )
    assert old.model.config.last_level_cache_kb is None
    assert all(
        m.log_rates.shape[1] == 5 and float(m.log_rates[:, 4].detach().max()) < -25 for m in old.model.members
    )
    below = _network(40, 16, "below-cache")
    assert old.predict(below).total_ms == pytest.approx(spill_predictor.predict(below).total_ms, rel=0.01)
    assert not any("last-level cache" in w for w in old.predict(_network(16, 4096, "old")).warnings)


def test_the_spill_point_is_the_smaller_of_the_cache_and_the_mapping_threshold() -> None:
    xeon = LPNetConfig(last_level_cache_kb=491520, fresh_mapping_kb=32768)
    assert xeon.spill_kb == 32768
    assert xeon.log_spill_weights == LPNetConfig(last_level_cache_kb=32768).log_spill_weights
    assert LPNetConfig(last_level_cache_kb=16384, fresh_mapping_kb=32768).spill_kb == 16384
    assert LPNetConfig(fresh_mapping_kb=32768).spill_kb == 32768
    # 36 MB of convolution weights spill at a 32 MB mapping threshold whatever the cache; 31.6 MB do not.
    log_weights = torch.log(torch.tensor([31.6, 36.0]) * 2**20 / 4)
    assert spills(log_weights, xeon.log_spill_weights).tolist() == [False, True]
    assert not spills(log_weights, LPNetConfig(last_level_cache_kb=491520).log_spill_weights).any()


def test_a_mapping_threshold_below_the_cache_prices_and_warns_as_the_spill_point(
    spill_predictor: LatencyPredictor,
) -> None:
    # The same fitted predictor, its spill point now set by the allocator under a far larger cache.
    data = dump_predictor(spill_predictor)
    config = {**CONFIG.to_dict(), "last_level_cache_kb": 1024 * CACHE_KB, "fresh_mapping_kb": CACHE_KB}
    mapped = load_predictor(
        save_tensors(load_tensors(data), metadata={**read_header(data), "config": json.dumps(config)})
    )
    network = _network(80, 16, "dense-past-the-threshold")
    assert mapped.predict(network).total_ms == spill_predictor.predict(network).total_ms
    spill = [w for w in mapped.predict(_network(16, 4096, "wide-pointwise")).warnings if "256 KB" in w]
    assert len(spill) == 1
    assert "more than the 64 KB past which this device's allocator maps a convolution's reordered" in spill[0]
