"""The cold-call term: a layer's price grows with the traffic since the last layer of its kind ran."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.groups import apply_width_vector
from lpnet.arch.ir import Network
from lpnet.predictor.features import (
    _MASKED_MAX_ELEMENTS,
    GAP_INPUTS,
    NUMERIC_FEATURES,
    RATE_KIND_INDEX,
    kind_gaps,
    tensorize,
    work_terms,
)
from lpnet.predictor.model import INITIAL_LOG_CACHE, LPNetConfig, cold_share
from lpnet.predictor.samples import NetworkSample, pack_samples
from lpnet.predictor.train import initial_log_rates

GAP = NUMERIC_FEATURES.index("log_kind_gap_elements")


def _network(wide: int = 64) -> Network:
    module = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, wide, 3, padding=1),
        nn.BatchNorm2d(wide),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(wide, 10),
    )
    return network_from_module(module, (1, 3, 16, 16), name="gaps")


def _gaps(network: Network) -> dict[str, float]:
    tn = tensorize(network, with_groups=False)
    features = tn.layer_features(torch.zeros(1, 0))[0]
    return {name: math.expm1(float(v)) for name, v in zip(tn.layer_names, features[:, GAP], strict=True)}


def test_the_gap_is_the_weights_and_largest_activation_of_the_layers_since_the_kind_last_ran() -> None:
    network = _network()
    layers = {layer.name: layer for layer in network.layers}
    names = [layer.name for layer in network.layers]
    gaps = _gaps(network)
    # The second batch norm runs after the second conv and the first ReLU.
    second_bn, second_conv, relu = names[4], names[3], names[2]
    conv = layers[second_conv]
    conv_weights = conv.in_channels * conv.out_channels * 9
    largest = max(
        layer.in_channels * layer.in_hw[0] * layer.in_hw[1]
        + layer.out_channels * layer.out_hw[0] * layer.out_hw[1]
        for layer in (layers[relu], conv)
    )
    # Parameterless layers count one element of weights (log params 0).
    assert gaps[second_bn] == pytest.approx(conv_weights + 1 + largest, rel=1e-4)
    # The pool and the linear layer are alone of their kinds: each waits a whole forward, all the
    # other layers, which holds the gap between the two batch norms and the linear layer's weights.
    assert gaps[names[6]] > gaps[second_bn]
    assert gaps[names[6]] - gaps[names[8]] == pytest.approx(650 - 1, abs=1e-3 * gaps[names[6]])


def test_the_gap_follows_the_widths_the_same_way_in_both_prediction_paths() -> None:
    network = _network(wide=64)
    narrow = _network(wide=16)
    # Fewer channels in the second conv: less traffic before the second batch norm.
    assert _gaps(narrow)[narrow.layers[4].name] < _gaps(network)[network.layers[4].name]
    # A width vector of the wide network gives the features the pruned network has on its own.
    tn = tensorize(network)
    widths = tn.full_widths.clone()
    widths[widths == 64] = 16
    pruned = apply_width_vector(network, [int(w) for w in widths.tolist()])
    from_vector = tn.layer_features(widths[None])[0]
    alone = tensorize(pruned, with_groups=False).layer_features(torch.zeros(1, 0))[0]
    assert torch.allclose(from_vector[:, GAP], alone[:, GAP], rtol=1e-5)


def test_initial_rates_recover_a_known_cold_cost() -> None:
    # Layer times that follow a work law plus a cold-call cost: the non-negative fit finds the
    # per-call and the cold rates apart for the kinds with enough timed layers.
    samples = []
    for index, wide in enumerate([8, 16, 24, 32, 48, 64, 96, 128, 160, 192]):
        network = _network(wide)
        network = network.model_copy(update={"name": f"cold{index}"})
        tn = tensorize(network, with_groups=False)
        work = work_terms(tn.layer_features(torch.zeros(1, 0))[0])
        cold = torch.exp(cold_share(work[:, 2], torch.tensor(INITIAL_LOG_CACHE)))
        per_layer = {
            name: float(0.01 + 0.05 * c) for name, c in zip(tn.layer_names, cold.tolist(), strict=True)
        }
        samples.append(NetworkSample(network, sum(per_layer.values()), per_layer))
    rates = torch.exp(initial_log_rates(pack_samples(samples), LPNetConfig().log_spill_weights))
    for kind in ("batchnorm2d", "relu"):
        fitted = rates[RATE_KIND_INDEX[kind]]
        assert float(fitted[2]) == pytest.approx(0.01, rel=0.05)
        assert float(fitted[3]) == pytest.approx(0.05, rel=0.05)


def test_many_width_vectors_take_the_same_gaps_as_one() -> None:
    # Past `_MASKED_MAX_ELEMENTS` the largest activation of each gap is taken slice by slice instead
    # of through one mask: both ways give every row the gaps it has on its own.
    tn = tensorize(_network())
    features = tn.layer_features(tn.full_widths[None])[:, :, list(GAP_INPUTS)]  # (1, L, 3)
    one = kind_gaps(features, tn.gap_start, tn.gap_stop)
    rows = _MASKED_MAX_ELEMENTS // (2 * tn.num_layers * tn.num_layers) + 1
    many = kind_gaps(features.expand(rows, -1, -1), tn.gap_start, tn.gap_stop)
    assert torch.allclose(many, one.expand(rows, -1))
