"""A layer's bias: priced by the base as one more pass over its output, never by the correction.

A profile's biased convolutions are mostly tiny (squeeze-excitation), so a correction that saw the
flag could learn to double the price of every biased layer; these tests pin the bias to the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lpnet.arch.from_torch import network_from_module
from lpnet.arch.ir import Network
from lpnet.predictor.features import NUMERIC_FEATURES, rate_kinds, tensorize, work_terms
from lpnet.predictor.model import LPNet, LPNetConfig

BIAS = NUMERIC_FEATURES.index("bias")
LOG_IN, LOG_OUT, LOG_PARAMS = (
    NUMERIC_FEATURES.index(f"log_{n}") for n in ("in_elements", "out_elements", "params")
)


def _network(bias: bool) -> Network:
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 128, 1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(128, 32, 1, bias=bias),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return network_from_module(module.eval(), (1, 3, 28, 28), name=f"bias-{bias}")


def _features(bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tn = tensorize(_network(bias), with_groups=False)
    return tn.layer_features(torch.zeros(1, 0)), tn.ops


def test_the_bias_adds_one_pass_over_the_output_to_the_elements_moved() -> None:
    plain, _ = _features(False)
    biased, _ = _features(True)
    changed = (biased[0, :, BIAS] != plain[0, :, BIAS]).nonzero().flatten().tolist()
    assert len(changed) == 2  # the two 1x1 convolutions
    for layer in changed:
        f = biased[0, layer]
        elements = (math.exp(f[LOG_IN]), math.exp(f[LOG_OUT]), math.exp(f[LOG_PARAMS]))
        moved_plain = float(work_terms(plain[0, layer])[1])
        moved_biased = float(work_terms(f)[1])
        assert math.isclose(math.exp(moved_plain), sum(elements), rel_tol=1e-4)
        assert math.isclose(math.exp(moved_biased), sum(elements) + elements[1], rel_tol=1e-4)


def test_the_correction_does_not_see_the_bias() -> None:
    torch.manual_seed(0)
    model = LPNet(LPNetConfig(members=3))
    with torch.no_grad():  # a correction that depends on its inputs, as a fitted one does
        for member in model.members:
            member.head.weight.normal_()
            member.head.bias.normal_()
    plain, ops = _features(False)
    biased, _ = _features(True)
    kinds = rate_kinds(ops, plain)
    x_plain, x_biased = model.normalise(plain, kinds), model.normalise(biased, kinds)
    assert torch.equal(x_plain, x_biased)
    ops_b = ops.expand(x_plain.shape[:-1])
    for member in model.members:
        assert torch.equal(member.correction(x_plain, ops_b), member.correction(x_biased, ops_b))
    # So a bias moves a layer's price only through its base: by less than its share of the work.
    with torch.no_grad():
        ratio = model.member_layer_ms(biased, ops) / model.member_layer_ms(plain, ops)
    assert (
        bool((ratio >= 1.0 - 1e-6).all()) and bool((ratio < 1.5).all()) and bool((ratio > 1.0 + 1e-6).any())
    )
