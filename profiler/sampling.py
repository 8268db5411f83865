"""What to measure: width vectors over channel groups, and single layers around them.

Samples are deterministic from a seed and carry a `sample_key` (a hash of kind, configuration and
device spec), so a rerun regenerates the same keys and skips what a sink already holds.

Per family three streams are produced lazily, each capped by `SamplingConfig`:
  network / in_context: the unpruned net, uniform-width points (every group at the same keep
      ratio), then Latin-hypercube blocks of per-group keep ratios in [min_ratio, max_ratio];
  isolated: every distinct layer config of the unpruned net, then the same configs with their
      channel counts scaled by Latin-hypercube ratios.

The family `generated` (`GENERATED_FAMILY`) is not one architecture but a stream of them: seeded
networks from `lpnet.arch.generator`'s profiling seeds (plain, residual, bottleneck, inverted,
concat-branch blocks; every kernel, stride, group count and activation the generator draws), each
measured once, and for `isolated` their distinct layers. It is what lets a predictor fitted on a
profile answer for networks unlike the profiled families. The evaluation seeds are never sampled.
The family `generated_transformer` (`TRANSFORMER_FAMILY`) is `generated` with transformer-style
networks (the generator's `TRANSFORMER_SEEDS`) among its candidates for in-context timing, which
the kind-coverage order takes while attention and layer norm are thinly covered.

`Sampler.next_batch(done, size, bucket, scorer)` is the hook for an adaptive mode: a scorer that
returns a predicted error per candidate makes the sampler hand out the worst-predicted first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lpnet.arch.generator import PROFILING_SEEDS, TRANSFORMER_SEEDS, generate_network
from lpnet.arch.ir import Layer, Network
from lpnet.errors import GenerationError
from profiler.batch import NETWORK_KINDS, MeasurementKind
from profiler.coverage import SYNTHETIC_FAMILIES
from profiler.device import DeviceSpec
from profiler.errors import UnknownFamily
from profiler.family_names import GENERATED_FAMILY, OP_COVERAGE_FAMILY, TRANSFORMER_FAMILY, WIDE_DENSE_FAMILY
from profiler.kind_coverage import KindCoverage, coverage_ordered
from profiler.variation import ISOLATED_OPS, latin_hypercube, scale_layer, widths_from_ratios

logger = logging.getLogger(__name__)

SAMPLE_KEY_VERSION = 1
DEFAULT_FAMILIES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "vgg11",
    OP_COVERAGE_FAMILY,
    WIDE_DENSE_FAMILY,
    GENERATED_FAMILY,
)
# Offsets into the profiling seeds of the generated networks measured as each kind, so that whole
# networks, in-context layers and isolated layers cover different architectures.
_GENERATED_OFFSETS = {
    MeasurementKind.NETWORK: 0,
    MeasurementKind.IN_CONTEXT: 300_000,
    MeasurementKind.ISOLATED: 600_000,
}
# `generated` with every `TRANSFORMER_EVERY`-th in-context candidate a transformer-style network,
# so attention and layer norm, which no generated CNN has, are timed in context. Not a default: those
# networks' layers, as the IR builds them, also move the prices of CNN layers (docs/predictor.md).
TRANSFORMER_EVERY = 6
BucketKey = tuple[str, MeasurementKind]
"""(family, kind): the unit the budget planner shares time between."""

Scorer = Callable[[Sequence["Sample"]], Sequence[float]]
"""Returns a predicted error per candidate; higher means more worth measuring."""


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layer_config_hash(layer: Layer) -> str:
    """Hash of what a layer computes (op, shapes, arity), not of its name or wiring."""
    config = layer.model_dump(mode="json", exclude={"name", "inputs"})
    config["arity"] = len(layer.inputs)
    return _sha(config)


def sample_key(kind: MeasurementKind, config_hash: str, device: DeviceSpec, replicate: int = 0) -> str:
    """The deterministic key of measuring `config_hash` as `kind` on `device`.

    `replicate` > 0 asks for a deliberate re-measurement of the same configuration.
    """
    digest = _sha([SAMPLE_KEY_VERSION, kind.value, config_hash, device.to_dict(), replicate])
    return f"{kind.value}-{digest[:40]}"


@dataclass(frozen=True)
class Sample:
    """One configuration to measure."""

    kind: MeasurementKind
    sample_key: str
    family: str | None = None
    network: Network | None = None
    layer: Layer | None = None
    width_vector: tuple[int, ...] | None = None
    keep_ratios: tuple[float, ...] | None = None
    origin: str = ""  # how the sampler chose it: unpruned, uniform, lhs, base, scaled

    def __post_init__(self) -> None:
        if self.kind in NETWORK_KINDS and self.network is None:
            raise ValueError(f"a {self.kind.value} sample needs a network")
        if self.kind is MeasurementKind.ISOLATED and self.layer is None:
            raise ValueError("an isolated sample needs a layer")

    @property
    def bucket(self) -> BucketKey:
        return (self.family or "", self.kind)

    @classmethod
    def for_network(
        cls,
        network: Network,
        device: DeviceSpec,
        kind: MeasurementKind = MeasurementKind.NETWORK,
        family: str | None = None,
        width_vector: Sequence[int] | None = None,
        replicate: int = 0,
        origin: str = "",
    ) -> Sample:
        """A network sample keyed by the network's content hash."""
        return cls(
            kind=kind,
            sample_key=sample_key(kind, network.content_hash, device, replicate),
            family=family or network.family or network.name,
            network=network,
            width_vector=tuple(width_vector) if width_vector is not None else None,
            origin=origin,
        )

    @classmethod
    def for_layer(
        cls, layer: Layer, device: DeviceSpec, family: str | None = None, replicate: int = 0, origin: str = ""
    ) -> Sample:
        """An isolated-layer sample keyed by the layer's config hash."""
        kind = MeasurementKind.ISOLATED
        return cls(
            kind=kind,
            sample_key=sample_key(kind, layer_config_hash(layer), device, replicate),
            family=family,
            layer=layer,
            origin=origin,
        )


class Sampler(ABC):
    """Hands out samples bucket by bucket; never the same key twice."""

    @abstractmethod
    def buckets(self) -> list[BucketKey]:
        """Every (family, kind) this sampler can produce samples for."""

    @abstractmethod
    def next_batch(
        self,
        done: AbstractSet[str],
        size: int = 1,
        bucket: BucketKey | None = None,
        scorer: Scorer | None = None,
    ) -> list[Sample]:
        """Up to `size` samples not in `done` and not handed out before.

        Args:
            done: keys already measured (a sink's `done_keys()`); they are skipped.
            size: how many samples to return at most; fewer (or none) once a bucket runs dry.
            bucket: restrict to one (family, kind); any bucket, in turn, if None.
            scorer: adaptive mode: rates a pool of candidates by predicted error; the highest go first.
        """

    def planned_total(self, buckets: Sequence[BucketKey] | None = None) -> int | None:  # noqa: ARG002
        """How many samples this sampler would hand out in total (over `buckets`), if known."""
        return None

    @property
    def skipped(self) -> int:
        """Samples passed over so far because their key was in `done`."""
        return 0


class _QueueSampler(Sampler):
    """Shared machinery: one lazily filled queue of samples per bucket."""

    #: candidates shown to a scorer per requested sample.
    pool_factor = 4
    #: consecutive already-seen samples after which a bucket's source counts as exhausted.
    max_repeats = 500

    def __init__(self) -> None:
        self._issued: set[str] = set()
        self._queues: dict[BucketKey, list[Sample]] = {}
        self._sources: dict[BucketKey, Iterator[Sample]] = {}
        self._caps: dict[BucketKey, int] = {}
        self._yielded: dict[BucketKey, int] = {}
        self._skipped = 0
        self._turn = 0

    def _add_bucket(self, bucket: BucketKey, source: Iterable[Sample], cap: int) -> None:
        self._queues[bucket] = []
        self._sources[bucket] = iter(source)
        self._caps[bucket] = cap
        self._yielded[bucket] = 0

    def buckets(self) -> list[BucketKey]:
        return list(self._queues)

    def planned_total(self, buckets: Sequence[BucketKey] | None = None) -> int | None:
        keys = self._caps if buckets is None else [b for b in buckets if b in self._caps]
        return sum(self._caps[b] for b in keys)

    @property
    def skipped(self) -> int:
        return self._skipped

    def _fill(self, bucket: BucketKey, want: int, done: AbstractSet[str]) -> None:
        queue = self._queues[bucket]
        source = self._sources[bucket]
        repeats = 0
        while len(queue) < want and self._yielded[bucket] < self._caps[bucket]:
            sample = next(source, None)
            if sample is None or repeats >= self.max_repeats:
                # A source that only repeats itself has covered its space (tiny groups, few distinct widths).
                self._caps[bucket] = self._yielded[bucket]
                break
            if sample.sample_key in self._issued or any(s.sample_key == sample.sample_key for s in queue):
                repeats += 1  # the same configuration reached twice (e.g. a ratio that rounds to full width)
                continue
            repeats = 0
            self._yielded[bucket] += 1
            if sample.sample_key in done:
                self._skipped += 1
                continue
            queue.append(sample)

    def next_batch(
        self,
        done: AbstractSet[str],
        size: int = 1,
        bucket: BucketKey | None = None,
        scorer: Scorer | None = None,
    ) -> list[Sample]:
        if bucket is not None and bucket not in self._queues:
            raise KeyError(f"unknown bucket {bucket}; this sampler has {self.buckets()}")
        order = [bucket] if bucket is not None else self._round_robin()
        batch: list[Sample] = []
        for key in order:
            while len(batch) < size:
                want = size - len(batch)
                self._fill(key, want * (self.pool_factor if scorer else 1), done)
                queue = self._queues[key]
                # `done` may have grown since the queue was filled.
                queue[:] = [s for s in queue if s.sample_key not in done]
                if not queue:
                    break
                if scorer is not None:
                    scores = list(scorer(queue))
                    if len(scores) != len(queue):
                        raise ValueError(f"scorer returned {len(scores)} scores for {len(queue)} candidates")
                    ranked = sorted(range(len(queue)), key=lambda i: -scores[i])
                    chosen = sorted(ranked[:want])
                else:
                    chosen = list(range(min(want, len(queue))))
                picked = [queue[i] for i in chosen]
                queue[:] = [s for i, s in enumerate(queue) if i not in set(chosen)]
                self._issued.update(s.sample_key for s in picked)
                batch.extend(picked)
            if len(batch) >= size:
                break
        return batch

    def _round_robin(self) -> list[BucketKey]:
        keys = self.buckets()
        if not keys:
            return []
        self._turn = (self._turn + 1) % len(keys)
        return keys[self._turn :] + keys[: self._turn]


class ListSampler(_QueueSampler):
    """A fixed list of samples, bucketed by (family, kind), in the given order."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        super().__init__()
        grouped: dict[BucketKey, list[Sample]] = {}
        for sample in samples:
            grouped.setdefault(sample.bucket, []).append(sample)
        for bucket, items in grouped.items():
            self._add_bucket(bucket, items, len(items))


@dataclass(frozen=True)
class SamplingConfig:
    """Caps and ranges of the stratified sampler (counts are per family)."""

    kinds: tuple[MeasurementKind, ...] = (
        MeasurementKind.NETWORK,
        MeasurementKind.IN_CONTEXT,
        MeasurementKind.ISOLATED,
    )
    network_samples: int = 64
    in_context_samples: int = 8
    isolated_samples: int = 64
    uniform_points: int = 6
    min_ratio: float = 0.1
    max_ratio: float = 1.0
    lhs_block: int = 16
    seed: int = 0
    # Sampled widths are multiples of this where a group allows (`sampling_step`), as the widths a
    # predictor is asked about are: a plan's (the planner rounds to 8 by default), and nearly every
    # published and generated network's. SIMD kernels price them apart: mobilenet_v2 one channel
    # narrower in every group runs about 8 % slower than the network itself. 1 samples every width.
    channel_step: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.max_ratio <= 1:
            raise ValueError(f"need 0 < min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        if self.lhs_block < 1 or self.uniform_points < 0 or self.channel_step < 1:
            raise ValueError("lhs_block and channel_step must be >= 1 and uniform_points >= 0")
        for name in ("network_samples", "in_context_samples", "isolated_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def cap(self, kind: MeasurementKind) -> int:
        return {
            MeasurementKind.NETWORK: self.network_samples,
            MeasurementKind.IN_CONTEXT: self.in_context_samples,
            MeasurementKind.ISOLATED: self.isolated_samples,
        }[kind]

    @classmethod
    def for_budget(cls, **overrides: Any) -> SamplingConfig:
        """Caps high enough that a time budget, not a count, ends the run."""
        values: dict[str, Any] = {
            "network_samples": 100_000,
            "in_context_samples": 100_000,
            "isolated_samples": 100_000,
        }
        values.update(overrides)
        return cls(**values)


def _stable_int(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16)


def sampling_step(channels: int, divisor: int, channel_step: int) -> int:
    """The step of a group's sampled widths: the least common multiple of its divisor and
    `channel_step` when its full width is a multiple of that (the unpruned width stays on the
    grid), else its divisor."""
    step = math.lcm(max(1, divisor), channel_step)
    return step if channels % step == 0 else max(1, divisor)


@dataclass
class _Family:
    name: str
    network: Network
    channels: list[int] = field(default_factory=list)
    divisors: list[int] = field(default_factory=list)


class StratifiedSampler(_QueueSampler):
    """Width vectors and isolated layers over model families; see the module docstring."""

    def __init__(
        self,
        networks: Mapping[str, Network],
        device: DeviceSpec,
        config: SamplingConfig | None = None,
        generated_batch: int | None = None,
        transformers: bool = False,
    ) -> None:
        """Args:
        networks: the families' unpruned networks by family name.
        device: the device measured (part of every sample key).
        config: caps and ranges.
        generated_batch: also sample the `generated` family, at this batch size.
        transformers: offer transformer-style networks among the generated in-context candidates.
        """
        super().__init__()
        from lpnet.arch.groups import channel_groups

        self.device = device
        self.config = config or SamplingConfig()
        self.generated_batch = generated_batch
        self.transformers = transformers
        self.families: dict[str, _Family] = {}
        for name, network in networks.items():
            groups = channel_groups(network)
            self.families[name] = _Family(
                name,
                network,
                [g.channels for g in groups],
                [sampling_step(g.channels, g.divisor, self.config.channel_step) for g in groups],
            )
        for name in self.families:
            for kind in self.config.kinds:
                cap = self.config.cap(kind)
                if cap > 0:
                    self._add_bucket((name, kind), self._stream(name, kind), cap)
        if generated_batch is not None:
            for kind in self.config.kinds:
                cap = self.config.cap(kind)
                if cap > 0:
                    self._add_bucket((GENERATED_FAMILY, kind), self._generated_stream(kind), cap)

    @classmethod
    def for_families(
        cls,
        families: Sequence[str],
        device: DeviceSpec,
        config: SamplingConfig | None = None,
        input_shape: Sequence[int] = (1, 3, 224, 224),
        skip_unsupported: bool = True,
    ) -> StratifiedSampler:
        """Build each family's IR, skipping unsupported families with a warning. A family is a torchvision
        classification model's name, a synthetic family (`profiler.coverage.SYNTHETIC_FAMILIES`),
        `generated` or `generated_transformer`."""
        from lpnet.arch.from_torch import network_from_torchvision
        from lpnet.errors import LpnetError, UnknownModel

        networks: dict[str, Network] = {}
        for name in families:
            if name in (GENERATED_FAMILY, TRANSFORMER_FAMILY):
                continue
            if name in SYNTHETIC_FAMILIES:
                networks[name] = SYNTHETIC_FAMILIES[name](input_shape)
                continue
            try:
                networks[name] = network_from_torchvision(name, input_shape)
            except UnknownModel as exc:
                raise UnknownFamily(str(exc), {"family": name}) from exc
            except LpnetError as exc:
                if not skip_unsupported:
                    raise UnknownFamily(
                        f"family {name!r} cannot be profiled: {exc}", {"family": name}
                    ) from exc
                logger.warning("skipping family %s: %s", name, exc)
        transformers = TRANSFORMER_FAMILY in families
        generated = GENERATED_FAMILY in families or transformers
        if not networks and not generated:
            raise UnknownFamily(
                f"none of the families {list(families)} can be profiled", {"families": list(families)}
            )
        batch = input_shape[0] if generated else None
        return cls(networks, device, config, generated_batch=batch, transformers=transformers)

    # Streams ----------------------------------------------------------------------------------------

    def _rng(self, *parts: object) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, _stable_int(*parts)])

    def _stream(self, family: str, kind: MeasurementKind) -> Iterator[Sample]:
        if kind is MeasurementKind.ISOLATED:
            return self._layer_stream(family)
        return self._width_stream(family, kind)

    def _ratio_vectors(self, family: str, kind: MeasurementKind) -> Iterator[tuple[str, list[float]]]:
        dims = len(self.families[family].channels)
        cfg = self.config
        yield "unpruned", [1.0] * dims
        if cfg.uniform_points > 0:
            for ratio in np.linspace(cfg.max_ratio, cfg.min_ratio, cfg.uniform_points + 1)[1:]:
                yield "uniform", [float(ratio)] * dims
        block = 0
        while True:
            points = latin_hypercube(
                self._rng(family, kind.value, block), cfg.lhs_block, dims, cfg.min_ratio, cfg.max_ratio
            )
            for point in points:
                yield "lhs", [float(r) for r in point]
            block += 1

    def _width_stream(self, family: str, kind: MeasurementKind) -> Iterator[Sample]:
        from lpnet.arch.groups import apply_width_vector

        fam = self.families[family]
        if not fam.channels:  # nothing prunable: only the network itself
            yield Sample.for_network(fam.network, self.device, kind, family, origin="unpruned")
            return
        for origin, ratios in self._ratio_vectors(family, kind):
            widths = widths_from_ratios(ratios, fam.channels, fam.divisors)
            network = fam.network if widths == fam.channels else apply_width_vector(fam.network, widths)
            sample = Sample.for_network(network, self.device, kind, family, widths, origin=origin)
            yield replace(sample, keep_ratios=tuple(ratios))

    def generated_networks(self, kind: MeasurementKind) -> Iterator[Network]:
        """The generated networks measured as `kind`, in order; seeds the generator cannot fit into
        its cost bounds are passed over."""
        start = (_stable_int(self.config.seed, "generated") + _GENERATED_OFFSETS[kind]) % len(PROFILING_SEEDS)
        return self._seeded_networks(PROFILING_SEEDS, start)

    def transformer_networks(self) -> Iterator[Network]:
        """The transformer-style networks offered for in-context timing, in order."""
        start = _stable_int(self.config.seed, "transformer") % len(TRANSFORMER_SEEDS)
        return self._seeded_networks(TRANSFORMER_SEEDS, start)

    def _seeded_networks(self, seeds: range, start: int) -> Iterator[Network]:
        for i in range(len(seeds)):
            seed = seeds[(start + i) % len(seeds)]
            try:
                network = generate_network(seed)
            except GenerationError as exc:
                logger.debug("generated seed %d skipped: %s", seed, exc)
                continue
            batch = self.generated_batch or 1
            if network.input_shape[0] != batch:
                shape = (batch, *network.input_shape[1:])
                network = Network.model_validate({**network.model_dump(), "input_shape": shape})
            yield network

    def in_context_candidates(self) -> Iterator[Network]:
        """The generated CNNs timed in context; with `transformers`, every `TRANSFORMER_EVERY`-th
        candidate a transformer-style network, which `coverage_ordered` takes while attention and
        layer norm are thinly covered and leaves in its window once they are not."""
        networks = self.generated_networks(MeasurementKind.IN_CONTEXT)
        if not self.transformers:
            yield from networks
            return
        transformers = self.transformer_networks()
        for index, network in enumerate(networks):
            if index % TRANSFORMER_EVERY == TRANSFORMER_EVERY - 1:
                transformer = next(transformers, None)
                if transformer is not None:
                    yield transformer
            yield network

    def _generated_stream(self, kind: MeasurementKind) -> Iterator[Sample]:
        if kind in NETWORK_KINDS:
            networks: Iterable[Network] = self.generated_networks(kind)
            if kind is MeasurementKind.IN_CONTEXT:
                # Every family's unpruned network is timed in context first: its layers count as covered.
                covered = KindCoverage(family.network for family in self.families.values())
                networks = coverage_ordered(self.in_context_candidates(), covered)
            for network in networks:
                yield Sample.for_network(network, self.device, kind, GENERATED_FAMILY, origin="generated")
            return
        seen: set[str] = set()
        for network in self.generated_networks(kind):
            for layer in distinct_isolated_layers(network.layers, seen):
                yield Sample.for_layer(layer, self.device, GENERATED_FAMILY, origin="generated")

    def base_layers(self, family: str) -> list[Layer]:
        """Distinct layer configs of a family's unpruned network that are worth timing alone."""
        return list(distinct_isolated_layers(self.families[family].network.layers, set()))

    def _layer_stream(self, family: str) -> Iterator[Sample]:
        bases = self.base_layers(family)
        if not bases:
            return
        cfg = self.config
        for layer in bases:
            yield Sample.for_layer(layer, self.device, family, origin="base")
        block = 0
        while True:
            rng = self._rng(family, "isolated", block)
            n = max(cfg.lhs_block, len(bases))
            ratios = latin_hypercube(rng, n, 2, cfg.min_ratio, cfg.max_ratio)
            order = rng.permutation(n) % len(bases)
            produced = 0
            for (r_in, r_out), index in zip(ratios, order, strict=True):
                scaled = scale_layer(bases[int(index)], float(r_in), float(r_out))
                if scaled is not None:
                    produced += 1
                    yield Sample.for_layer(scaled, self.device, family, origin="scaled")
            if not produced:  # no base layer can be scaled validly: nothing more to offer
                return
            block += 1


def distinct_isolated_layers(layers: Iterable[Layer], seen: set[str]) -> Iterator[Layer]:
    """The layers worth timing alone whose config hash is not in `seen` yet (added as they go)."""
    for layer in layers:
        if layer.op not in ISOLATED_OPS:
            continue
        digest = layer_config_hash(layer)
        if digest not in seen:
            seen.add(digest)
            yield layer
