"""Reading one ONNX node: its name, its attributes by type, and the numbers of its constant operands."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from lpnet.arch.onnx_io.limits import MAX_RANK, numel
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def node_scope(node: onnx.NodeProto) -> str:
    """The name of the module a node was exported from: its name without the last path component."""
    name = node_name(node)
    return name.rpartition("/")[0] or name


def enum_name(enum: Any, number: int) -> str:
    """The name of a protobuf enum value, or its number when this onnx version does not know it."""
    try:
        return str(enum.Name(number))
    except ValueError:
        return str(number)


class Attributes:
    """A node's attributes by name, each read as the type its operator defines for it."""

    def __init__(self, node: onnx.NodeProto, where: str) -> None:
        self.by_name = {attr.name: attr for attr in node.attribute}
        self.op_type = node.op_type
        self.where = where

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get_int(self, name: str, default: int) -> int:
        attr = self._typed(name, AttributeProto.INT)
        return default if attr is None else int(attr.i)

    def get_float(self, name: str, default: float) -> float:
        attr = self._typed(name, AttributeProto.FLOAT)
        return default if attr is None else float(attr.f)

    def get_string(self, name: str, default: str) -> str:
        attr = self._typed(name, AttributeProto.STRING)
        return default if attr is None else attr.s.decode(errors="replace")

    def get_ints(self, name: str, default: tuple[int, ...], length: int) -> tuple[int, ...]:
        """An INTS attribute of a 2-D window (`length` values), checked before it is copied."""
        attr = self._typed(name, AttributeProto.INTS)
        if attr is None:
            return default
        if len(attr.ints) != length:
            raise UnsupportedOperator(
                self.op_type,
                self.where,
                f"only 2-D windows are supported: {name} has {len(attr.ints)} values, expected {length}",
            )
        return tuple(attr.ints)

    def get_axes(self, name: str) -> tuple[int, ...]:
        """An INTS attribute listing tensor axes, at most MAX_RANK of them."""
        attr = self._typed(name, AttributeProto.INTS)
        if attr is None or len(attr.ints) > MAX_RANK:
            raise UnsupportedOperator(self.op_type, self.where, f"{name} must list at most {MAX_RANK} axes")
        return tuple(attr.ints)

    def _typed(self, name: str, expected: int) -> AttributeProto | None:
        attr = self.by_name.get(name)
        if attr is not None and attr.type != expected:
            found = enum_name(AttributeProto.AttributeType, attr.type)
            wanted = enum_name(AttributeProto.AttributeType, expected)
            raise InvalidArchitecture(
                f"attribute {name!r} of {self.op_type} node {self.where!r} must be {wanted}, got {found}",
                {"node": self.where, "attribute": name},
            )
        return attr


def constant_number(tensor: TensorProto, attrs: Attributes) -> float:
    """The one number a constant tensor holds (an operand of the node `attrs` belong to)."""
    if numel(tuple(tensor.dims)) != 1 or tensor.data_type == TensorProto.STRING:
        raise UnsupportedOperator(
            attrs.op_type, attrs.where, f"constant {tensor.name!r} must hold a single number"
        )
    return float(constant_values(tensor, attrs).item())


def constant_values(tensor: TensorProto, attrs: Attributes) -> np.ndarray:
    """The numbers of a constant tensor (an operand of the node `attrs` belong to)."""
    try:
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind not in "biuf":
            raise TypeError(f"elements of type {values.dtype} are not real numbers")
        return values
    except (ValueError, TypeError, KeyError) as exc:
        # Data that does not fit its declared shape, or an element type with no real number.
        raise InvalidArchitecture(
            f"ONNX constant {tensor.name!r} of node {attrs.where!r} cannot be read as a number: {exc}",
            {"node": attrs.where, "tensor": tensor.name},
        ) from exc
