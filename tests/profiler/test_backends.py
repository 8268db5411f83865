from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lpnet.arch.build import build_module
from lpnet.arch.ir import Network
from profiler.backends import available_backends, get_backend, registered_backends
from profiler.backends.onnxruntime_cpu import export_onnx
from profiler.errors import BackendUnavailable, InvalidDeviceSpec, UnknownBackend
from profiler.protocol import TimingProtocol, measure_runnable


def test_unknown_backend_lists_valid_choices() -> None:
    with pytest.raises(UnknownBackend) as info:
        get_backend("tensorrt")
    message = str(info.value)
    for name in ("torch-cpu", "onnxruntime-cpu", "torch-cuda"):
        assert name in message
    assert info.value.code == "unknown_backend"
    assert info.value.details["valid"] == registered_backends()


@pytest.mark.parametrize("threads", [0, -1, (os.cpu_count() or 1) + 1])
@pytest.mark.parametrize("name", ["torch-cpu", "onnxruntime-cpu"])
def test_thread_count_out_of_range_names_the_valid_range(name: str, threads: int) -> None:
    with pytest.raises(InvalidDeviceSpec) as info:
        get_backend(name, threads=threads)
    assert f"valid range is 1..{os.cpu_count()}" in str(info.value)
    assert info.value.details["max"] == os.cpu_count()


def test_unsupported_dtype_lists_valid_dtypes() -> None:
    with pytest.raises(InvalidDeviceSpec, match="valid choices: float32"):
        get_backend("onnxruntime-cpu", dtype="bfloat16")


def test_cpu_backends_are_available_here() -> None:
    usable = available_backends()
    assert "torch-cpu" in usable
    assert "onnxruntime-cpu" in usable
    assert ("torch-cuda" in usable) == torch.cuda.is_available()


def test_torch_cpu_pins_thread_count(tiny_network: Network) -> None:
    backend = get_backend("torch-cpu", threads=1)
    runnable = backend.prepare(tiny_network)
    torch.set_num_threads(os.cpu_count() or 1)  # someone else changes the process-wide setting
    assert runnable.timed_runs(2) > 0
    assert torch.get_num_threads() == 1


def test_onnxruntime_measures_a_tiny_network(tiny_network: Network, fast_protocol: TimingProtocol) -> None:
    module = build_module(tiny_network)
    example = torch.randn(1, 3, 32, 32)
    backend = get_backend("onnxruntime-cpu", threads=1)
    runnable = backend.prepare(module, example)
    result = measure_runnable(runnable, fast_protocol)
    assert result.median_ms > 0
    assert result.p10_ms <= result.median_ms <= result.p90_ms
    assert backend.settings()["intra_op_num_threads"] == 1


def test_onnx_export_computes_what_torch_computes(tiny_network: Network) -> None:
    import onnxruntime as ort

    module = build_module(tiny_network)
    example = torch.randn(1, 3, 32, 32)
    session = ort.InferenceSession(export_onnx(module, example), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        torch_out = module(example)
    torch.testing.assert_close(torch.from_numpy(np.asarray(onnx_out)), torch_out, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_torch_cuda_without_gpu_says_what_to_use() -> None:
    assert "torch-cuda" in registered_backends()
    with pytest.raises(BackendUnavailable, match="torch-cpu"):
        get_backend("torch-cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_measures_a_tiny_network(tiny_network: Network, fast_protocol: TimingProtocol) -> None:
    backend = get_backend("torch-cuda", threads=1)
    runnable = backend.prepare(tiny_network)
    result = measure_runnable(runnable, fast_protocol)
    assert result.median_ms > 0
    assert all(ms >= 0 for ms in runnable.run_layerwise().values())
