"""Sharing a time budget between (family, kind) buckets.

Every bucket gets a share of the budget: each kind's share, of which the generated streams take
`GENERATED_SHARE` and the named families split the rest evenly (a kind with only one of the two
splits it evenly over its families). The next sample always comes from the bucket that has spent
least relative to its share, so time left by a bucket that runs dry flows to the others. Per-sample
cost is the running average of the bucket (or of all buckets of its kind, or a prior), which also
gives the progress bar its estimated total.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from profiler.batch import MeasurementKind
from profiler.family_names import GENERATED_FAMILY, TRANSFORMER_FAMILY
from profiler.sampling import BucketKey

DEFAULT_KIND_SHARES: Mapping[MeasurementKind, float] = {
    MeasurementKind.NETWORK: 0.35,
    MeasurementKind.IN_CONTEXT: 0.4,
    MeasurementKind.ISOLATED: 0.25,
}
# The part of each kind's time that the generated streams take when named families share the kind.
# A named family's width variants are built from its few layers and a predictor learns them quickly;
# every unseen network is priced from what the generated networks taught (docs/predictor.md).
GENERATED_SHARE = 0.5
_GENERATED_FAMILIES = frozenset({GENERATED_FAMILY, TRANSFORMER_FAMILY})
# Seconds per sample before anything has been measured: a typical 1 %-precision network timing.
PRIOR_SECONDS: Mapping[MeasurementKind, float] = {
    MeasurementKind.NETWORK: 5.0,
    MeasurementKind.IN_CONTEXT: 12.0,
    MeasurementKind.ISOLATED: 1.5,
}


@dataclass
class _Spend:
    seconds: float = 0.0
    count: int = 0


@dataclass
class BudgetPlanner:
    """Chooses the next bucket to sample from; with `total_seconds=None` it only interleaves."""

    buckets: list[BucketKey]
    total_seconds: float | None = None
    kind_shares: Mapping[MeasurementKind, float] = field(default_factory=lambda: dict(DEFAULT_KIND_SHARES))
    shares: dict[BucketKey, float] = field(init=False)
    _spend: dict[BucketKey, _Spend] = field(init=False)
    _exhausted: set[BucketKey] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        if self.total_seconds is not None and not self.total_seconds > 0:
            raise ValueError(f"a budget must be positive, got {self.total_seconds} s")
        kinds = list(dict.fromkeys(kind for _, kind in self.buckets))
        kind_total = sum(self.kind_shares.get(kind, 0.0) for kind in kinds) or 1.0
        self.shares = {}
        for kind in kinds:
            share = self.kind_shares.get(kind, 0.0) / kind_total
            families = [family for family, k in self.buckets if k == kind]
            generated = [family for family in families if family in _GENERATED_FAMILIES]
            named = [family for family in families if family not in _GENERATED_FAMILIES]
            if not generated or not named:
                self.shares.update({(family, kind): share / len(families) for family in families})
                continue
            self.shares.update(
                {(family, kind): share * GENERATED_SHARE / len(generated) for family in generated}
            )
            self.shares.update(
                {(family, kind): share * (1 - GENERATED_SHARE) / len(named) for family in named}
            )
        self._spend = {bucket: _Spend() for bucket in self.buckets}

    @classmethod
    def from_minutes(cls, buckets: Iterable[BucketKey], minutes: float | None) -> BudgetPlanner:
        return cls(list(buckets), None if minutes is None else minutes * 60.0)

    # Bookkeeping -------------------------------------------------------------------------------------

    def record(self, bucket: BucketKey, seconds: float) -> None:
        """Account one finished sample of `bucket` that took `seconds`."""
        spend = self._spend[bucket]
        spend.seconds += seconds
        spend.count += 1

    def exhaust(self, bucket: BucketKey) -> None:
        """Mark `bucket` as having nothing left to sample."""
        self._exhausted.add(bucket)

    @property
    def spent_seconds(self) -> float:
        return sum(s.seconds for s in self._spend.values())

    def remaining_seconds(self) -> float:
        return math.inf if self.total_seconds is None else max(0.0, self.total_seconds - self.spent_seconds)

    def cost_estimate(self, bucket: BucketKey) -> float:
        """Expected seconds of the next sample of `bucket`: its running average, else its kind's, else a prior."""
        spend = self._spend[bucket]
        if spend.count:
            return spend.seconds / spend.count
        same_kind = [s for b, s in self._spend.items() if b[1] == bucket[1] and s.count]
        if same_kind:
            return sum(s.seconds for s in same_kind) / sum(s.count for s in same_kind)
        return PRIOR_SECONDS.get(bucket[1], 5.0)

    def _kind_measured(self, kind: MeasurementKind) -> bool:
        return any(s.count for b, s in self._spend.items() if b[1] == kind)

    # Decisions ---------------------------------------------------------------------------------------

    def active(self) -> list[BucketKey]:
        return [b for b in self.buckets if b not in self._exhausted and self.shares[b] > 0]

    def next_bucket(self) -> BucketKey | None:
        """The bucket to sample next, or None when the budget is spent or every bucket is dry.

        A sample whose expected cost exceeds what is left of the budget is not started unless
        nothing cheaper remains and at least half its cost is still available.
        """
        candidates = self.active()
        if not candidates:
            return None
        remaining = self.remaining_seconds()
        if remaining <= 0:
            return None
        # A kind never measured is always tried once: its prior is a guess, and one sample fixes it.
        unknown = {b for b in candidates if not self._kind_measured(b[1])}
        affordable = [b for b in candidates if b in unknown or self.cost_estimate(b) <= remaining]
        if not affordable:
            affordable = [b for b in candidates if self.cost_estimate(b) <= 2 * remaining]
            if not affordable:
                return None
        return min(affordable, key=lambda b: (self._spend[b].seconds / self.shares[b], self.buckets.index(b)))

    def estimated_remaining_samples(self) -> int | None:
        """How many more samples the budget is expected to buy (None without a budget)."""
        if self.total_seconds is None:
            return None
        active = self.active()
        if not active:
            return 0
        remaining = self.remaining_seconds()
        share_sum = sum(self.shares[b] for b in active)
        return int(sum(remaining * self.shares[b] / share_sum / self.cost_estimate(b) for b in active))
