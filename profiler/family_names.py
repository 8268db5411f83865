"""The families a profile can measure besides torchvision's classification models: their names and
what each measures, free of torch so that command lines, settings and schemas can describe them
before anything heavy is imported."""

from __future__ import annotations

# Seeded random CNNs (`lpnet.arch.generator`; the same name as its `PROFILING_FAMILY`).
GENERATED_FAMILY = "generated"
# Those, with every few in-context candidates a transformer-style network (`profiler.sampling`).
TRANSFORMER_FAMILY = "generated_transformer"
# One synthetic network with every IR operator (`profiler.coverage`).
OP_COVERAGE_FAMILY = "op_coverage"
# One synthetic network of dense convolutions too wide for the caches (`profiler.wide_dense`).
WIDE_DENSE_FAMILY = "wide_dense"

# What each measures, in the order descriptions list them.
SPECIAL_FAMILIES: dict[str, str] = {
    GENERATED_FAMILY: "seeded random CNNs, so the predictor answers for networks unlike the named families",
    TRANSFORMER_FAMILY: "those, and transformer-style networks timed in context",
    OP_COVERAGE_FAMILY: "every IR operator",
    WIDE_DENSE_FAMILY: "dense convolutions too wide for the caches",
}


def describe_special_families(mark: str = "", last: str = "and") -> str:
    """'generated (what it measures), ..., op_coverage (...) and wide_dense (...)': each name between
    `mark`s, the last joined by `last`."""
    parts = [f"{mark}{name}{mark} ({what})" for name, what in SPECIAL_FAMILIES.items()]
    return f"{', '.join(parts[:-1])} {last} {parts[-1]}"
