"""W-Gates: binarisation, gradients, and gating that matches physical pruning."""

from __future__ import annotations

import pytest
import torch

from lpnet.arch.ir import Network, Op
from lpnet.gates.wgates import (
    GateSet,
    WeightGate,
    WGateConfig,
    binarize,
    filter_vectors,
    gate_points,
    top_k_gates,
)
from lpnet.pruning import prune_module
from tests.lpnet.gates.conftest import tiny_module


def test_binarize_is_hard_forward_and_sigmoid_slope_backward() -> None:
    scores = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    gates = binarize(scores, temperature=1.0)
    torch.testing.assert_close(gates, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    gates.sum().backward()
    sig = torch.sigmoid(scores.detach())
    torch.testing.assert_close(scores.grad, sig * (1 - sig))


def test_filter_vectors_pool_long_filters_to_a_fixed_length() -> None:
    short = torch.randn(16, 4, 3, 3)  # 36 values per filter
    long = torch.randn(16, 64, 3, 3)  # 576 values per filter
    vectors = filter_vectors([short, long], max_dim=128)
    assert vectors.shape == (16, 36 + 128)


def test_gate_points_sit_after_the_batch_norm_of_each_conv(tiny_net: Network) -> None:
    points = gate_points(tiny_net)
    assert all(names for names in points)
    for names in points:
        assert all(tiny_net.by_name[name].op is Op.BATCHNORM2D for name in names)
    # The residual group of the first stage is gated after the stem's BN and the block's second BN.
    assert set(points[0]) == {"stem.1", "blocks.0.bn2"}


def test_ste_gradients_reach_every_gate_network(tiny_net: Network) -> None:
    module = tiny_module()
    gate_set = GateSet(module, tiny_net, WGateConfig(init_spread=1.0, init_score=0.5))
    gate_set.train()
    x = torch.randn(4, 3, 32, 32)
    with gate_set.attached(module):
        out = module(x)
        counts = gate_set.kept_counts()
    loss = out.pow(2).mean() + 0.01 * counts.sum()
    loss.backward()
    for gate in gate_set.gates:
        for parameter in gate.parameters():
            assert parameter.grad is not None
            assert float(parameter.grad.abs().sum()) > 0


def test_gated_module_computes_what_the_pruned_module_computes(tiny_net: Network) -> None:
    module = tiny_module()
    torch.manual_seed(3)
    gate_set = GateSet(module, tiny_net, WGateConfig(init_score=0.0, init_spread=1.0))
    gate_set.eval()  # deterministic gates
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), gate_set.attached(module):
        gated = module(x)
        gates = gate_set.current
    kept = [torch.nonzero(g).flatten().tolist() for g in gates]
    widths = [len(k) for k in kept]
    assert any(w < g.numel() for w, g in zip(widths, gates, strict=True)), "some channels must be gated off"
    pruned = prune_module(module, tiny_net, widths, kept)
    with torch.no_grad():
        torch.testing.assert_close(pruned.module(x), gated, atol=1e-5, rtol=1e-4)


def test_min_kept_filters_stay_open(tiny_net: Network) -> None:
    module = tiny_module()
    gate_set = GateSet(module, tiny_net, WGateConfig(init_score=-50.0), min_kept=[8] * 6)
    gate_set.eval()
    counts = [float(g.detach().sum()) for g in gate_set.compute()]
    assert counts == [8.0] * 6
    assert gate_set.expected_counts() == [8.0] * 6


def test_top_k_gates_open_exactly_k_and_push_hardest_on_filters_near_the_cut() -> None:
    scores = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 0.4], requires_grad=True)
    gates = top_k_gates(scores, 3)
    torch.testing.assert_close(gates, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    gates.sum().backward()
    assert scores.grad is not None
    grad = scores.grad.tolist()
    # The cut lies between 0.5 (kept) and 0.4 (dropped): those two filters get the largest slope.
    assert sorted(range(6), key=lambda i: -grad[i])[:2] in ([2, 5], [5, 2])
    assert min(grad) > 0
    assert top_k_gates(scores.detach(), 6).tolist() == [1.0] * 6
    assert top_k_gates(scores.detach(), 0).tolist() == [0.0] * 6


def test_set_counts_fixes_how_many_gates_each_group_opens(tiny_net: Network) -> None:
    module = tiny_module()
    gate_set = GateSet(module, tiny_net, WGateConfig(noise=1.0))
    counts = [max(1, len(s) // 3) for s in gate_set.scores()]
    gate_set.set_counts(counts)
    for mode in (gate_set.train, gate_set.eval):  # noisy scores or not, the counts hold
        mode()
        gates = gate_set.compute()
        assert [int(g.sum()) for g in gates] == counts
        assert gate_set.kept_counts().tolist() == counts
    gate_set.eval()
    scores = gate_set.scores()
    for gate, score, k in zip(gate_set.compute(), scores, counts, strict=True):
        assert set(torch.nonzero(gate).flatten().tolist()) == set(torch.topk(score, k).indices.tolist())
    with pytest.raises(ValueError, match="counts for"):
        gate_set.set_counts(counts[:-1])
    gate_set.set_counts(None)
    assert gate_set.fixed_counts is None


def test_the_magnitude_prior_starts_gates_ranking_filters_by_their_norm() -> None:
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(12, 20), dim=1)
    filters = directions * torch.linspace(0.1, 3.0, 12)[:, None]  # norms grow with the index
    gate = WeightGate(20, WGateConfig(magnitude_prior=50.0, init_spread=0.1))
    order = torch.argsort(gate.scores(filters)).tolist()
    assert order == list(range(12))
    plain = WeightGate(20, WGateConfig(magnitude_prior=0.0))
    assert plain.magnitude is None
    gate.scores(filters).sum().backward()  # the prior is learnt, not fixed
    assert gate.magnitude is not None and gate.magnitude.grad is not None
