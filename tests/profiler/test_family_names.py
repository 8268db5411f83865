"""The special families' names and descriptions match what profiling accepts."""

from __future__ import annotations

from lpnet.arch.generator import PROFILING_FAMILY
from profiler.coverage import SYNTHETIC_FAMILIES
from profiler.family_names import (
    GENERATED_FAMILY,
    SPECIAL_FAMILIES,
    TRANSFORMER_FAMILY,
    describe_special_families,
)


def test_the_generated_family_is_the_generators_profiling_family() -> None:
    assert GENERATED_FAMILY == PROFILING_FAMILY


def test_every_special_family_profiling_accepts_is_described() -> None:
    assert set(SPECIAL_FAMILIES) == {GENERATED_FAMILY, TRANSFORMER_FAMILY, *SYNTHETIC_FAMILIES}


def test_a_description_names_each_family_once_and_joins_the_last() -> None:
    text = describe_special_families("`", last="or")
    for name, what in SPECIAL_FAMILIES.items():
        assert text.count(f"`{name}` ({what})") == 1
    last = list(SPECIAL_FAMILIES)[-1]
    assert f" or `{last}`" in text and text.count(" or ") == 1
    assert describe_special_families().startswith(f"{GENERATED_FAMILY} (")
