"""A PyTorch module written to ONNX bytes."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from torch import nn

ONNX_OPSET = 17


def export_onnx(
    module: nn.Module, input_shape: Sequence[int], *, opset: int = ONNX_OPSET, dynamic_batch: bool = False
) -> bytes:
    """Export a module to ONNX bytes, keeping BatchNorm as its own node (no conv folding).

    Args:
        module: The module to export; it is exported in eval mode and left in the mode it was in.
        input_shape: The (N, C, H, W) shape of the example input.
        opset: The version of the default ONNX operator set to export with.
        dynamic_batch: Export the batch dimension of the input as symbolic.
    """
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(tuple(input_shape)),),
                buffer,  # type: ignore[arg-type]  # file-like objects are accepted
                dynamo=False,
                do_constant_folding=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}} if dynamic_batch else None,
            )
    finally:
        module.train(was_training)
    return buffer.getvalue()
