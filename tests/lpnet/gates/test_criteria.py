"""Baselines: uniform, L1 (per layer and global), Taylor; and matching a latency by bisection."""

from __future__ import annotations

import pytest
import torch

from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Network
from lpnet.gates.budget import width_grid
from lpnet.gates.criteria import TaylorImportance, get_criterion, match_latency, taylor_scores
from lpnet.predictor.predict import LatencyPredictor
from lpnet.pruning import group_l1_scores, prune_module
from tests.lpnet.gates.conftest import tiny_module


def _batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(count)
    ]


def test_uniform_and_l1_per_layer_share_widths_but_not_channels(tiny_net: Network) -> None:
    module = tiny_module()
    grid = width_grid(channel_layout(tiny_net))
    uniform = get_criterion("uniform").select(module, tiny_net, 0.5, grid)
    l1 = get_criterion("l1-layer").select(module, tiny_net, 0.5, grid)
    assert uniform.widths == l1.widths == [16, 16, 32, 32, 64, 64]
    assert uniform.kept_indices[2] == list(range(32))
    scores = group_l1_scores(module, tiny_net)
    for s, keep in zip(scores, l1.kept_indices, strict=True):
        dropped = [i for i in range(len(s)) if i not in keep]
        assert float(s[keep].min()) >= float(s[dropped].max())


def test_l1_global_keeps_about_the_ratio_of_all_channels(tiny_net: Network) -> None:
    grid = width_grid(channel_layout(tiny_net))
    selection = get_criterion("l1-global").select(tiny_module(), tiny_net, 0.5, grid)
    assert selection.criterion == "l1-global"
    assert abs(sum(selection.widths) - 0.5 * sum(grid.channels)) <= 8 * len(grid.channels)
    assert all(w in grid.allowed(g) for g, w in enumerate(selection.widths))


def test_taylor_scores_come_from_gradients_and_select_valid_widths(tiny_net: Network) -> None:
    module = tiny_module()
    scores = taylor_scores(module, tiny_net, _batches(), max_batches=3)
    assert [len(s) for s in scores] == [32, 32, 64, 64, 128, 128]
    assert all(bool((s >= 0).all()) and float(s.sum()) > 0 for s in scores)
    assert all(p.grad is None for p in module.parameters())
    grid = width_grid(channel_layout(tiny_net))
    selection = TaylorImportance(_batches(), max_batches=3).select(module, tiny_net, 0.4, grid)
    pruned = prune_module(module, tiny_net, selection.widths, selection.kept_indices)
    assert pruned.widths == selection.widths


def test_match_latency_finds_the_largest_setting_under_the_target(
    tiny_net: Network, tiny_predictor: LatencyPredictor
) -> None:
    grid = width_grid(channel_layout(tiny_net))
    target = 0.6 * tiny_predictor.predict(tiny_net).total_ms
    calls: list[Network] = []

    def latency_of(network: Network) -> float:
        calls.append(network)
        return tiny_predictor.predict(network).total_ms

    criterion = get_criterion("uniform")
    selection, ms = match_latency(criterion, tiny_module(), tiny_net, grid, latency_of, target)
    assert ms <= target
    assert len({c.content_hash for c in calls}) == len(calls)  # each width vector evaluated once
    # Of every setting tried, the one returned is the widest that met the target.
    chosen = sum(layer.out_channels for layer in apply_width_vector(tiny_net, selection.widths).layers)
    for network in calls:
        if tiny_predictor.predict(network).total_ms <= target:
            assert sum(layer.out_channels for layer in network.layers) <= chosen


def test_unknown_criterion_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="l1-global"):
        get_criterion("random")
