"""ONNX Runtime on the CPU: the module is exported to ONNX in memory and run in one session."""

from __future__ import annotations

import io
import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch

from profiler.backends.base import Backend, Runnable
from profiler.errors import BackendUnavailable

if TYPE_CHECKING:
    from torch import nn

    from lpnet.arch.ir import Network

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(module: nn.Module, example_input: torch.Tensor, opset_version: int = 17) -> bytes:
    """Serialise `module` traced on `example_input` to ONNX bytes, without touching the disk.

    torch 2.14 still ships the TorchScript-based exporter (`dynamo=False`), which needs nothing
    beyond torch and onnx; the dynamo exporter needs `onnxscript` and is used only as a fallback.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated on every call; the warning is known.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                module,
                (example_input,),
                buffer,  # type: ignore[arg-type]  # file-likes work; the stub only names paths
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset_version,
                do_constant_folding=True,
            )
            return buffer.getvalue()
        except TypeError as exc:  # a torch without the legacy exporter rejects dynamo=False's kwargs
            logger.info("legacy ONNX exporter unavailable (%s); trying the dynamo exporter", exc)
    try:
        program = torch.onnx.export(
            module, (example_input,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME]
        )
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(
            f"the ONNX export needs a package that is not installed ({exc}); install 'onnxscript'",
            {"backend": "onnxruntime-cpu"},
        ) from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise BackendUnavailable("torch.onnx.export returned no program", {"backend": "onnxruntime-cpu"})
    return bytes(program.model_proto.SerializeToString())


class OnnxRuntimeRunnable(Runnable):
    """One InferenceSession and its input feed."""

    def __init__(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> None:
        self.session = session
        self.feed = feed

    def run(self) -> None:
        self.session.run(None, self.feed)

    def close(self) -> None:
        del self.session


class OnnxRuntimeCpuBackend(Backend):
    """ONNX Runtime, CPUExecutionProvider, `threads` intra-op threads, sequential execution."""

    name = "onnxruntime-cpu"
    dtypes = ("float32",)
    supports_layerwise = False

    @staticmethod
    def is_available() -> bool:
        return "CPUExecutionProvider" in ort.get_available_providers()

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        return options

    def prepare(self, module: nn.Module | Network, example_input: torch.Tensor | None = None) -> Runnable:
        built = self.as_module(module)
        example = self.default_input(module, example_input).to(torch.float32)
        with torch.no_grad():
            model_bytes = export_onnx(built, example)
        session = ort.InferenceSession(
            model_bytes, self.session_options(), providers=["CPUExecutionProvider"]
        )
        input_name = session.get_inputs()[0].name
        return OnnxRuntimeRunnable(session, {input_name: example.numpy()})

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "onnxruntime": ort.__version__,
            "intra_op_num_threads": self.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "all",
        }
