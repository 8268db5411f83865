"""Width variants for a network's dedicated predictor: widths a plan of that network can have."""

from __future__ import annotations

import pytest

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.gates.budget import width_grid
from profiler.variants import width_variants


@pytest.mark.parametrize("name", ["resnext50_32x4d", "mobilenet_v2"])
def test_every_variant_lies_on_the_planners_grid_and_builds(name: str) -> None:
    network = network_from_torchvision(name, (1, 3, 64, 64))
    grid = width_grid(channel_layout(network))
    if name == "resnext50_32x4d":  # its grouped convolutions keep multiples of 32, not just 8
        assert max(grid.step) == 32
    vectors = width_variants(network, 12, seed=3)
    assert vectors[0] == grid.full_widths and vectors[1] == grid.min_widths
    assert len({tuple(v) for v in vectors}) == len(vectors)
    for vector in vectors:
        for group, width in enumerate(vector):
            assert width in grid.allowed(group), (group, width)
        apply_width_vector(network, vector)


def test_variants_are_deterministic_for_a_seed() -> None:
    network = network_from_torchvision("mobilenet_v2", (1, 3, 64, 64))
    assert width_variants(network, 6, seed=1) == width_variants(network, 6, seed=1)
    assert width_variants(network, 6, seed=1) != width_variants(network, 6, seed=2)
