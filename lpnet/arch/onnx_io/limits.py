"""Limits on what an ONNX file may declare or compute, and the checks that name the limit exceeded."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from lpnet.arch.ir import MAX_CHANNELS, MAX_SPATIAL
from lpnet.errors import OnnxLimitExceeded

# Versions of the default ONNX operator set the reader accepts; other domains are refused.
MIN_OPSET = 7
MAX_OPSET = 21

# Limits on a model, far above what an image CNN exports to. Counts run over all graphs of a model
# (main graph, subgraphs of If/Loop/Scan, training graphs, function bodies) and are checked before
# shape inference, so a file declaring a huge graph is refused without inferring it.
MAX_NODES = 20_000  # nodes
MAX_TENSORS = 50_000  # initializers and tensors held in node attributes
MAX_VALUES = 200_000  # node inputs and outputs, graph inputs, outputs and value_info entries
MAX_ATTRIBUTES = 200_000  # node attributes
MAX_GRAPHS = 1_000  # graphs and functions besides the main graph
MAX_SUBGRAPH_DEPTH = 8  # subgraphs nested inside subgraphs
# Limits on one tensor: the input, every constant, and every tensor shape inference finds. Dimension 1
# of an (N, C, H, W) tensor is bounded by the IR's MAX_CHANNELS, dimensions 2 and 3 by its MAX_SPATIAL.
MAX_RANK = 32  # dimensions
MAX_TENSOR_ELEMENTS = 2**31  # elements, and so also any single dimension
# Constants of up to this many elements keep their values: shape arithmetic, clip bounds, reduction
# axes. Larger ones (weights) keep only their type and shape, so shape inference never copies them and
# folding never computes them.
MAX_FOLDED_ELEMENTS = 4096
# Nodes computing only on constants; each is inferred and evaluated on its own (about 0.1 ms). A
# Caffe2-style export of densenet201 computes about 1,000 weights this way, torchvision's swin_v2_b
# about 15,800 shapes, masks and position biases.
MAX_FOLDED_NODES = 16_000
# Folding passes, each followed by shape inference: a pass can make the shapes static that the next
# one folds on (the split sizes of a chunk computed from a shape the first pass folded).
MAX_FOLD_PASSES = 3

# The counted limits by name, with what they count as an error message says it.
COUNT_LIMITS = {
    "nodes": (MAX_NODES, "nodes"),
    "tensors": (MAX_TENSORS, "constant tensors (initializers and tensors in attributes)"),
    "values": (MAX_VALUES, "value names (node inputs and outputs, graph inputs, outputs, value_info)"),
    "attributes": (MAX_ATTRIBUTES, "node attributes"),
    "graphs": (MAX_GRAPHS, "subgraphs and functions"),
}


def check_limit(limit: str, found: int | None, maximum: int, subject: str) -> None:
    if found is not None and found > maximum:
        raise OnnxLimitExceeded(limit, found, maximum, subject)


def check_rank(rank: int, subject: str) -> None:
    check_limit("rank", rank, MAX_RANK, f"the rank of {subject}")


def check_elements(sizes: Iterable[int], subject: str) -> None:
    total = 1
    for size in sizes:
        check_limit("tensor_elements", size, MAX_TENSOR_ELEMENTS, f"a dimension of {subject}")
        total *= size
    check_limit("tensor_elements", total, MAX_TENSOR_ELEMENTS, f"the number of elements of {subject}")


def check_tensor_shape(value: onnx.ValueInfoProto) -> None:
    """Refuse a tensor value above the rank, channel, spatial or element limits; unknown sizes pass."""
    if value.type.WhichOneof("value") != "tensor_type":
        return
    dims = value.type.tensor_type.shape.dim
    subject = f"tensor {value.name!r}"
    check_rank(len(dims), subject)
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(sizes) == 4:
        check_limit("channels", sizes[1], MAX_CHANNELS, f"the channel count (dimension 1) of {subject}")
        for axis in (2, 3):
            check_limit("spatial_size", sizes[axis], MAX_SPATIAL, f"dimension {axis} of {subject}")
    check_elements([size for size in sizes if size is not None], subject)


def numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total
