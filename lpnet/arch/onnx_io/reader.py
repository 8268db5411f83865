"""An untrusted ONNX file read into the IR: scanned, checked, folded, shape-inferred and converted."""

from __future__ import annotations

import itertools

import onnx
from google.protobuf.message import DecodeError

from lpnet.arch.ir import MAX_BATCH, Network
from lpnet.arch.onnx_io.checks import check_image_input, check_operators, check_opsets
from lpnet.arch.onnx_io.converter import OnnxConverter
from lpnet.arch.onnx_io.folding import ConstantFolder, constant_names, drop_weight_data, infer_shapes
from lpnet.arch.onnx_io.limits import MAX_FOLD_PASSES, check_tensor_shape
from lpnet.arch.onnx_io.scan import ModelScan
from lpnet.errors import InvalidArchitecture


def network_from_onnx(
    data: bytes, name: str | None = None, family: str | None = None, batch_size: int = 1
) -> Network:
    """Read an ONNX model (bytes) into the IR.

    Args:
        data: The serialised ModelProto, with every tensor inside it.
        name: The network's name; the graph's name when not given.
        family: The network's family.
        batch_size: The batch a symbolic batch dimension is fixed to; a fixed batch in the file is kept.

    Raises:
        ExternalDataRefused: A tensor anywhere in the model keeps its data in an external file.
        OnnxLimitExceeded: The model, or a constant it computes, is above one of the limits of
            `lpnet.arch.onnx_io.limits` (MAX_NODES, MAX_TENSOR_ELEMENTS, ...).
        UnsupportedOpset: It imports an operator set other than the default domain at versions
            MIN_OPSET to MAX_OPSET.
        UnsupportedOperator: Naming the first node the IR cannot represent.
        InvalidArchitecture: The file is not a usable ONNX graph with one image input
            (ArchitectureTooLarge when the network is beyond one of the IR's cost bounds).
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidArchitecture(
            f"batch_size must be from 1 to {MAX_BATCH}, got {batch_size}", {"batch_size": batch_size}
        )
    try:
        # Parses the bytes and nothing else: unlike onnx.load with a path, it follows no external data.
        model = onnx.load_from_string(data)
    except DecodeError as exc:
        raise InvalidArchitecture(f"not a readable ONNX model: {exc}") from exc
    ModelScan().model(model)
    if not model.HasField("graph"):
        raise InvalidArchitecture("not an ONNX model: the file holds no graph")
    opset = check_opsets(model)
    check_image_input(model.graph, constant_names(model.graph), batch_size)
    check_operators(model.graph)
    drop_weight_data(model.graph)
    model = infer_shapes(model)
    for _ in range(MAX_FOLD_PASSES):
        if not ConstantFolder(model, opset).fold():
            break
        del model.graph.value_info[:]
        model = infer_shapes(model)
    for value in itertools.chain(model.graph.value_info, model.graph.output):
        check_tensor_shape(value)
    return OnnxConverter(model, opset).convert(name, family)
