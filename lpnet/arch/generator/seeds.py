"""The seed ranges, the family of each, and the networks of seeds (the generator's public API)."""

from __future__ import annotations

from lpnet.arch.generator.assembler import fit_cost
from lpnet.arch.generator.plan import Draw, draw_plan
from lpnet.arch.generator.space import DEFAULT_SPACE, DesignSpace
from lpnet.arch.generator.transformer import generate_transformer
from lpnet.arch.ir import Network
from lpnet.errors import GenerationError

PROFILING_SEEDS = range(0, 10**6)
EVALUATION_SEEDS = range(10**9, 10**9 + 10**6)
DEVELOPMENT_SEEDS = range(2 * 10**9, 2 * 10**9 + 10**6)
# Transformer-style profiling networks (`lpnet.arch.generator.transformer`), of the profiling family.
TRANSFORMER_SEEDS = range(3 * 10**9, 3 * 10**9 + 10**6)
PROFILING_FAMILY = "generated"
EVALUATION_FAMILY = "generated-eval"
DEVELOPMENT_FAMILY = "generated-dev"
# Seed range and the family of its networks.
_RANGES: tuple[tuple[range, str], ...] = (
    (PROFILING_SEEDS, PROFILING_FAMILY),
    (EVALUATION_SEEDS, EVALUATION_FAMILY),
    (DEVELOPMENT_SEEDS, DEVELOPMENT_FAMILY),
    (TRANSFORMER_SEEDS, PROFILING_FAMILY),
)


def _ranges_text() -> str:
    return ", ".join(f"{family} {_describe(seeds)}" for seeds, family in _RANGES)


def seed_family(seed: int) -> str:
    """The family of the network a seed generates: profiling, evaluation or development.

    Raises:
        GenerationError: the seed lies in none of the seed ranges.
    """
    for seeds, family in _RANGES:
        if seed in seeds:
            return family
    raise GenerationError(f"seed {seed} lies in none of the seed ranges ({_ranges_text()})", {"seed": seed})


def generate_network(seed: int, space: DesignSpace = DEFAULT_SPACE) -> Network:
    """The network of one seed: named `gen-<seed>`, family by the seed's range, MACs within bounds;
    a transformer-style network (`generate_transformer`) for the transformer seeds.

    Raises:
        GenerationError: the seed lies outside the seed ranges, or the network cannot be rescaled
            into the space's MAC bounds.
    """
    family = seed_family(seed)
    if seed in TRANSFORMER_SEEDS:
        return generate_transformer(seed, f"gen-{seed}", family)
    plan = draw_plan(Draw(seed), space)
    return fit_cost(plan, space, f"gen-{seed}", family)


def generate_networks(seeds: range, count: int, space: DesignSpace = DEFAULT_SPACE) -> list[Network]:
    """The networks of the first `count` seeds of `seeds`, which must lie inside one seed range.

    Raises:
        GenerationError: `seeds` is not a step-1 range inside one of the seed ranges (so profiling,
            evaluation and development networks never mix), or holds fewer than `count` seeds.
    """
    if count < 0:
        raise GenerationError(f"count must be non-negative, got {count}", {"count": count})
    inside = any(
        seeds.step == 1 and allowed.start <= seeds.start and seeds.stop <= allowed.stop
        for allowed, _ in _RANGES
    )
    if not inside:
        raise GenerationError(
            f"seeds {_describe(seeds)} must be a step-1 range inside one seed range ({_ranges_text()})",
            {"seeds": _describe(seeds)},
        )
    if count > len(seeds):
        raise GenerationError(
            f"asked for {count} networks but seeds {_describe(seeds)} hold only {len(seeds)}",
            {"count": count, "seeds": _describe(seeds)},
        )
    return [generate_network(seed, space) for seed in seeds[:count]]


def _describe(seeds: range) -> str:
    step = f", {seeds.step}" if seeds.step != 1 else ""
    return f"range({seeds.start}, {seeds.stop}{step})"
