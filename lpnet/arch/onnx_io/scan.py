"""The first pass over an untrusted model: external data refused, sizes counted, names checked."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import onnx
from onnx import AttributeProto, TensorProto

from lpnet.arch.onnx_io.limits import (
    COUNT_LIMITS,
    MAX_SUBGRAPH_DEPTH,
    check_elements,
    check_limit,
    check_rank,
)
from lpnet.errors import ExternalDataRefused, InvalidArchitecture


class ModelScan:
    """One pass over every graph, node, attribute and tensor of a model, before anything else reads it.

    Refuses a tensor with external data wherever it is, and counts what the model declares against
    the limits, checking each container's length before walking into it. Opens no file. Also refuses
    names that are not UTF-8 (protobuf hands those over as bytes, which no error message can carry).
    """

    def __init__(self) -> None:
        self.totals = dict.fromkeys(COUNT_LIMITS, 0)

    def model(self, model: onnx.ModelProto) -> None:
        self.count("graphs", 2 * len(model.training_info) + len(model.functions))
        require_text((opset.domain for opset in model.opset_import), "opset imports")
        self.graph(model.graph, 0)
        for info in model.training_info:
            self.graph(info.initialization, 0)
            self.graph(info.algorithm, 0)
        for function in model.functions:
            owner = f"function {function.name!r}"
            require_text((function.name, function.domain), owner)
            self.count("nodes", len(function.node))
            self.count("attributes", len(function.attribute_proto))
            for attr in function.attribute_proto:
                self.attribute(attr, f"default of attribute {attr.name!r} of {owner}", 0)
            self.nodes(function.node, owner, 0)

    def count(self, limit: str, amount: int) -> None:
        total = self.totals[limit] + amount
        maximum, counted = COUNT_LIMITS[limit]
        check_limit(limit, total, maximum, f"the number of {counted}")
        self.totals[limit] = total

    def graph(self, graph: onnx.GraphProto, depth: int) -> None:
        check_limit("subgraph_depth", depth, MAX_SUBGRAPH_DEPTH, "the nesting depth of subgraphs")
        self.count("nodes", len(graph.node))
        self.count("tensors", len(graph.initializer) + len(graph.sparse_initializer))
        self.count("values", len(graph.input) + len(graph.output) + len(graph.value_info))
        owner = f"graph {graph.name!r}"
        require_text([graph.name], owner)
        values = itertools.chain(graph.input, graph.output, graph.value_info)
        require_text((value.name for value in values), owner)
        for tensor in graph.initializer:
            self.tensor(tensor, f"initializer of {owner}")
        for sparse in graph.sparse_initializer:
            self.sparse_tensor(sparse, f"sparse initializer of {owner}")
        self.nodes(graph.node, owner, depth)

    def nodes(self, nodes: Iterable[onnx.NodeProto], owner: str, depth: int) -> None:
        for node in nodes:
            self.count("values", len(node.input) + len(node.output))
            self.count("attributes", len(node.attribute))
            label = node.name or (node.output[0] if node.output else node.op_type)
            where = f"node {label!r} in {owner}"
            require_text(
                itertools.chain((node.name, node.op_type, node.domain), node.input, node.output), where
            )
            require_text((attr.name for attr in node.attribute), where)
            for attr in node.attribute:
                self.attribute(attr, f"attribute {attr.name!r} of {where}", depth)

    def attribute(self, attr: AttributeProto, where: str, depth: int) -> None:
        # Every field is walked whatever the attribute's declared type says.
        single_tensors = int(attr.HasField("t")) + int(attr.HasField("sparse_tensor"))
        self.count("tensors", single_tensors + len(attr.tensors) + len(attr.sparse_tensors))
        self.count("graphs", int(attr.HasField("g")) + len(attr.graphs))
        if attr.HasField("t"):
            self.tensor(attr.t, where)
        for tensor in attr.tensors:
            self.tensor(tensor, where)
        if attr.HasField("sparse_tensor"):
            self.sparse_tensor(attr.sparse_tensor, where)
        for sparse in attr.sparse_tensors:
            self.sparse_tensor(sparse, where)
        if attr.HasField("g"):
            self.graph(attr.g, depth + 1)
        for graph in attr.graphs:
            self.graph(graph, depth + 1)

    def tensor(self, tensor: TensorProto, where: str) -> None:
        require_text([tensor.name], where)
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            raise ExternalDataRefused(tensor.name, where)
        subject = f"tensor {tensor.name!r} ({where})"
        check_rank(len(tensor.dims), subject)
        check_elements(tensor.dims, subject)

    def sparse_tensor(self, sparse: onnx.SparseTensorProto, where: str) -> None:
        self.tensor(sparse.values, f"values of a {where}")
        self.tensor(sparse.indices, f"indices of a {where}")
        subject = f"sparse tensor {sparse.values.name!r} ({where})"
        check_rank(len(sparse.dims), subject)
        check_elements(sparse.dims, subject)


def require_text(names: Iterable[str | bytes], where: str) -> None:
    for name in names:
        if isinstance(name, bytes):
            raise InvalidArchitecture(
                f"the ONNX {where} has a name that is not UTF-8 text: {name!r}", {"where": where}
            )
