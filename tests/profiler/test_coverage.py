"""The op-coverage family: every IR operator, prunable, sampled and timed like a torchvision family."""

from __future__ import annotations

from lpnet.arch.build import build_module
from lpnet.arch.counting import network_cost
from lpnet.arch.ir import Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from profiler.backends import get_backend
from profiler.batch import MeasurementKind
from profiler.coverage import op_coverage_network
from profiler.device import DeviceSpec
from profiler.family_names import OP_COVERAGE_FAMILY
from profiler.measure import measure_sample
from profiler.protocol import TimingProtocol
from profiler.sampling import SamplingConfig, StratifiedSampler


def test_the_op_coverage_network_holds_every_operator_the_ir_knows() -> None:
    network = op_coverage_network((1, 3, 64, 64))
    assert {layer.op for layer in network.layers} == set(Op)
    # Activations appear at more than one resolution or channel count once widths vary.
    resolutions = {layer.in_hw for layer in network.layers if layer.op in (Op.RELU6, Op.SILU)}
    assert len(resolutions) >= 2


def test_its_width_variants_keep_every_operator_and_are_timed_in_context(
    device: DeviceSpec, fast_protocol: TimingProtocol
) -> None:
    sampler = StratifiedSampler.for_families(
        [OP_COVERAGE_FAMILY],
        device,
        SamplingConfig(network_samples=4, in_context_samples=4, isolated_samples=0, seed=3),
        input_shape=(1, 3, 64, 64),
    )
    samples = []
    while batch := sampler.next_batch(set(), size=4, bucket=(OP_COVERAGE_FAMILY, MeasurementKind.IN_CONTEXT)):
        samples.extend(batch)
    assert len({s.width_vector for s in samples}) >= 3
    pruned = [s for s in samples if s.origin != "unpruned"]
    assert pruned and all({layer.op for layer in s.network.layers} == set(Op) for s in pruned if s.network)

    measurement = measure_sample(pruned[0], get_backend("torch-cpu", threads=1), fast_protocol)
    assert measurement.status == "ok", measurement.error
    assert measurement.family == OP_COVERAGE_FAMILY
    timed_ops = {
        layer.op
        for layer in pruned[0].network.layers  # type: ignore[union-attr]
        for t in measurement.per_layer or []
        if t.layer == layer.name and t.ms > 0
    }
    assert {Op.SILU, Op.SIGMOID, Op.GELU, Op.TANH, Op.HARDSWISH, Op.HARDSIGMOID} <= timed_ops


def test_the_op_coverage_network_built_and_exported_to_onnx_reads_back_as_itself() -> None:
    network = op_coverage_network((1, 3, 64, 64))
    again = network_from_onnx(export_onnx(build_module(network), network.input_shape))
    # ONNX has no adaptive pooling: the 4x4 token map pooled to 2x2 is written as an AveragePool of
    # 2x2 windows, which is what avgpool2d(2, stride 2) writes too, so it reads as that layer; the
    # computation and its cost are the same. Every other layer, the token and patch-merging layers
    # included, reads back as itself.
    (pool,) = [
        layer for layer in network.layers if layer.op is Op.ADAPTIVE_AVGPOOL2D and layer.out_hw != (1, 1)
    ]
    window = (pool.in_hw[0] // pool.out_hw[0], pool.in_hw[1] // pool.out_hw[1])
    averaged = pool.model_copy(update={"op": Op.AVGPOOL2D, "kernel": window, "stride": window})
    layers = [averaged if layer is pool else layer for layer in network.layers]
    expected = Network(input_shape=network.input_shape, layers=layers, outputs=network.outputs)
    assert [layer.op for layer in again.layers] == [layer.op for layer in expected.layers]
    assert again.content_hash == expected.content_hash
    assert network_cost(again) == network_cost(network)
