"""What gets measured: whole networks, every layer in context, and single layers on their own.

Each `measure_*` function times one configuration and raises if it cannot run; `measure_sample`
wraps them for the runner and turns any failure into a `failed` measurement carrying the error,
so one bad configuration never stops a run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from lpnet.arch.build import IR_LAYER_META
from lpnet.arch.ir import NETWORK_INPUT, Layer, Network, Op
from profiler.backends.base import Backend, Runnable
from profiler.batch import MAX_ERROR_CHARS, LayerTime, Measurement, MeasurementKind
from profiler.errors import UnsupportedMeasurement
from profiler.protocol import ProbeFn, TimingProtocol, TimingResult, measure_layerwise, measure_runnable
from profiler.sampling import Sample
from profiler.speed import PROBE_VERSION

logger = logging.getLogger(__name__)

ISOLATED_LAYER_NAME = "layer"


@dataclass(frozen=True)
class InContextResult:
    """A whole-network timing and the in-context median of each layer.

    `network.median_ms == layers_sum_ms + residual_ms` by construction; the residual is the
    per-forward cost outside any layer (Python glue, allocation) and is reported, not hidden.
    """

    network: TimingResult
    layers_ms: dict[str, float]
    layerwise_total: TimingResult

    @property
    def layers_sum_ms(self) -> float:
        return float(sum(self.layers_ms.values()))

    @property
    def residual_ms(self) -> float:
        return self.network.median_ms - self.layers_sum_ms

    @property
    def additivity(self) -> float:
        """Sum of in-context layer medians over the whole-network median."""
        return self.layers_sum_ms / self.network.median_ms


def network_input(network: Network, batch_size: int) -> torch.Tensor:
    """A random input of the network's shape with `batch_size` as N."""
    _, channels, height, width = network.input_shape
    return torch.randn(batch_size, channels, height, width)


def _prepare_network(
    network: Network, backend: Backend, batch_size: int, width_vector: Sequence[int] | None
) -> tuple[fx.GraphModule, Runnable]:
    if width_vector is not None:
        from lpnet.arch.groups import apply_width_vector

        network = apply_width_vector(network, width_vector)
    from lpnet.arch.build import build_module

    module = build_module(network)
    return module, backend.prepare(module, network_input(network, batch_size))


def measure_network(
    network: Network,
    backend: Backend,
    protocol: TimingProtocol,
    batch_size: int = 1,
    width_vector: Sequence[int] | None = None,
    probe: ProbeFn | None = None,
) -> TimingResult:
    """Whole-network latency of an IR network, optionally pruned to `width_vector` first.

    With `probe` (profiler.speed), every sample is timed between two probe runs and the result adds
    the latency relative to the probe.
    """
    _, runnable = _prepare_network(network, backend, batch_size, width_vector)
    try:
        return measure_runnable(runnable, protocol, probe)
    finally:
        runnable.close()


def measure_in_context(
    network: Network,
    backend: Backend,
    protocol: TimingProtocol,
    batch_size: int = 1,
    width_vector: Sequence[int] | None = None,
    probe: ProbeFn | None = None,
) -> InContextResult:
    """Whole-network latency and every layer timed inside real forwards of the same module, interleaved."""
    if not backend.supports_layerwise:
        raise UnsupportedMeasurement(
            f"backend {backend.name!r} cannot time layers in context; use a torch backend",
            {"backend": backend.name},
        )
    module, runnable = _prepare_network(network, backend, batch_size, width_vector)
    try:
        timing = measure_layerwise(runnable, protocol, probe)
    finally:
        runnable.close()
    node_to_layer: dict[str, str] = module.meta.get(IR_LAYER_META, {})
    layers: dict[str, float] = {}
    for node, ms in timing.layers_ms.items():
        # Extra nodes of a multi-input add chain have no IR name of their own; they keep the node name.
        name = node_to_layer.get(node, node)
        layers[name] = layers.get(name, 0.0) + ms
    return InContextResult(network=timing.network, layers_ms=layers, layerwise_total=timing.layerwise_total)


def isolated_network(layer: Layer) -> tuple[Network, tuple[int, ...]]:
    """A one-layer network computing `layer` alone, and the shape (without N) of its input.

    Multi-input ops read the network input several times; a concat's inputs split its channels
    evenly. A linear layer takes a (N, C) input, as it does after a flatten.
    """
    arity = len(layer.inputs)
    channels = layer.in_channels
    if layer.op is Op.CONCAT:
        if channels % arity:
            raise UnsupportedMeasurement(
                f"concat of {arity} inputs with {channels} channels cannot be split evenly for isolated timing"
            )
        channels //= arity
    single = Layer.model_validate(
        {**layer.model_dump(), "name": ISOLATED_LAYER_NAME, "inputs": [NETWORK_INPUT] * arity}
    )
    network = Network(
        name=f"isolated-{layer.op.value}",
        input_shape=(1, channels, layer.in_hw[0], layer.in_hw[1]),
        layers=[single],
        outputs=[ISOLATED_LAYER_NAME],
    )
    shape: tuple[int, ...] = (channels,) if layer.op is Op.LINEAR else (channels, *layer.in_hw)
    return network, shape


def measure_layer(
    layer: Layer, backend: Backend, protocol: TimingProtocol, batch_size: int = 1
) -> TimingResult:
    """Latency of one layer built and run on its own."""
    from lpnet.arch.build import build_module

    network, shape = isolated_network(layer)
    runnable = backend.prepare(build_module(network), torch.randn(batch_size, *shape))
    try:
        return measure_runnable(runnable, protocol)
    finally:
        runnable.close()


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def _timing_fields(result: TimingResult) -> dict[str, object]:
    return {
        "median_ms": result.median_ms,
        "p10_ms": result.p10_ms,
        "p90_ms": result.p90_ms,
        "mean_ms": result.mean_ms,
        "cv": result.cv,
        "repetitions": result.repetitions,
        "precision": result.precision,
        "precision_reached": result.precision_reached,
        "probe_ms": result.probe_ms,
        "relative_latency": result.relative,
        "probe_version": PROBE_VERSION if result.probe_ms is not None else None,
    }


def measure_sample(
    sample: Sample,
    backend: Backend,
    protocol: TimingProtocol,
    batch_size: int = 1,
    probe: ProbeFn | None = None,
) -> Measurement:
    """Measure one sample; a configuration that fails becomes a `failed` row with its error.

    `probe` (profiler.speed) brackets the samples of network and in-context measurements (for the
    latter, each pair of a plain and a layer-by-layer forward); isolated layers are too short for a
    probe around each of them and go without.
    """
    start = time.perf_counter()
    common = _sample_fields(sample)
    try:
        fields: dict[str, object]
        if sample.kind is MeasurementKind.ISOLATED:
            assert sample.layer is not None  # guaranteed by Sample's own check
            fields = _timing_fields(measure_layer(sample.layer, backend, protocol, batch_size))
        else:
            assert sample.network is not None
            if sample.kind is MeasurementKind.NETWORK:
                fields = _timing_fields(
                    measure_network(sample.network, backend, protocol, batch_size, probe=probe)
                )
            else:
                result = measure_in_context(sample.network, backend, protocol, batch_size, probe=probe)
                per_layer = [LayerTime(layer=name, ms=ms) for name, ms in result.layers_ms.items()]
                layers_sum = sum(t.ms for t in per_layer)
                fields = {
                    **_timing_fields(result.network),
                    "per_layer": per_layer,
                    "layers_sum_ms": layers_sum,
                    "residual_ms": result.network.median_ms - layers_sum,
                }
        return Measurement.model_validate({**common, **fields, "duration_s": time.perf_counter() - start})
    except Exception as exc:  # any failure of one configuration is recorded, the run goes on
        message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        logger.warning(
            "sample %s (%s, %s) failed: %s", sample.sample_key, sample.kind.value, sample.family, message
        )
        return failed_measurement(sample, message, time.perf_counter() - start)


def _sample_fields(sample: Sample) -> dict[str, object]:
    """What every measurement of `sample` carries, whether it succeeded or not."""
    return {
        "sample_key": sample.sample_key,
        "kind": sample.kind,
        "family": sample.family,
        "architecture": sample.network,
        "layer": sample.layer,
        "width_vector": list(sample.width_vector) if sample.width_vector is not None else None,
        "load_average_1m": _load_1m(),
    }


def failed_measurement(sample: Sample, error: str, duration_s: float) -> Measurement:
    """A `failed` row for `sample` carrying `error` (cut to the stored length)."""
    return Measurement.model_validate(
        {
            **_sample_fields(sample),
            "status": "failed",
            "error": error[:MAX_ERROR_CHARS],
            "duration_s": duration_s,
        }
    )
