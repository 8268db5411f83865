"""Adaptive sampling: measure first the generated networks a predictor is least sure of.

nn-Meter's adaptive sampling: once a predictor exists, measuring where its ensemble disagrees teaches
it more than measuring at random. `AdaptiveSampler` wraps a sampler. For each sample of the generated
family's whole-network buckets (network, in_context) it draws a pool of candidates from the wrapped
sampler, so they come from the profiling seeds in the wrapped sampler's seeded order, without the keys
already measured, and hands out the one the scorer ranks highest; the rest of the pool is passed over
for this run. Every other bucket (the named families' width variants, isolated layers) is handed out
as the wrapped sampler has it.

A scorer is any `NetworkScorer`; `lpnet.predictor.predict.LatencyPredictor.log_spread`, the ensemble's
relative spread on a network, is the one the service's refining uses. Picks are deterministic for a
sampler seed, a scorer and the keys already measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

from lpnet.arch.ir import Network
from profiler.batch import NETWORK_KINDS
from profiler.sampling import GENERATED_FAMILY, BucketKey, Sample, Sampler, Scorer

NetworkScorer = Callable[[Network], float]
"""Rates a candidate network; higher means more worth measuring."""

# Candidates scored per pick: a prediction takes a few ms and a measurement seconds.
DEFAULT_POOL = 12


class AdaptiveSampler(Sampler):
    """`inner`'s samples, the generated networks among them picked by `scorer` from pools of `pool`.

    Args:
        inner: The sampler candidates are drawn from (a `StratifiedSampler` with the generated family).
        scorer: Rates a candidate network; the highest of each pool is handed out.
        pool: Candidates drawn per pick (fewer when the bucket runs dry).
        family: The family whose whole-network buckets are picked adaptively.
    """

    def __init__(
        self,
        inner: Sampler,
        scorer: NetworkScorer,
        pool: int = DEFAULT_POOL,
        family: str = GENERATED_FAMILY,
    ) -> None:
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.inner = inner
        self.scorer = scorer
        self.pool = pool
        self.adaptive_buckets = frozenset(
            bucket for bucket in inner.buckets() if bucket[0] == family and bucket[1] in NETWORK_KINDS
        )
        self.passed_over = 0
        self._turn = 0

    def buckets(self) -> list[BucketKey]:
        return self.inner.buckets()

    def next_batch(
        self,
        done: AbstractSet[str],
        size: int = 1,
        bucket: BucketKey | None = None,
        scorer: Scorer | None = None,
    ) -> list[Sample]:
        """Up to `size` samples; `scorer` applies to the buckets this sampler does not pick itself."""
        if bucket is None:
            return self._in_turn(done, size, scorer)
        if bucket not in self.adaptive_buckets:
            return self.inner.next_batch(done, size, bucket, scorer)
        batch: list[Sample] = []
        while len(batch) < size:
            candidates = self.inner.next_batch(done, self.pool, bucket)
            if not candidates:
                break
            batch.append(self._best(candidates))
            self.passed_over += len(candidates) - 1
        return batch

    def planned_total(self, buckets: Sequence[BucketKey] | None = None) -> int | None:
        total = 0
        for bucket in self.buckets() if buckets is None else buckets:
            planned = self.inner.planned_total([bucket])
            if planned is None:
                return None
            total += -(-planned // self.pool) if bucket in self.adaptive_buckets else planned
        return total

    @property
    def skipped(self) -> int:
        return self.inner.skipped

    def _best(self, candidates: list[Sample]) -> Sample:
        """The candidate scored highest (the first of equals); a NaN score counts as the lowest."""
        scores = []
        for sample in candidates:
            assert sample.network is not None  # whole-network kinds always carry their network
            score = float(self.scorer(sample.network))
            scores.append(-math.inf if math.isnan(score) else score)
        return candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]

    def _in_turn(self, done: AbstractSet[str], size: int, scorer: Scorer | None) -> list[Sample]:
        keys = self.buckets()
        if not keys:
            return []
        self._turn = (self._turn + 1) % len(keys)
        batch: list[Sample] = []
        for key in keys[self._turn :] + keys[: self._turn]:
            batch.extend(self.next_batch(done, size - len(batch), key, scorer))
            if len(batch) >= size:
                break
        return batch
