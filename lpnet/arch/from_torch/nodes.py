"""Reading fx nodes: a node's tensor shape, a call's arguments by name, and the IR's (H, W) of a shape."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from lpnet.errors import UnsupportedOperator


def tensor_shape(node: Any) -> tuple[int, ...]:
    """The shape that shape propagation recorded for `node`, which must be a single tensor."""
    meta: Callable[..., Any] | Any = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise UnsupportedOperator(
            "non-tensor value",
            getattr(node, "name", str(node)),
            "only single tensors can flow between layers",
        )
    return tuple(int(d) for d in meta.shape)


def hw(shape: tuple[int, ...]) -> tuple[int, int]:
    """The IR's (H, W) of an (N, C, H, W) or (N, F) shape."""
    if len(shape) == 4:
        return shape[2], shape[3]
    if len(shape) == 2:
        return 1, 1
    raise UnsupportedOperator("tensor rank", str(shape), "only (N, C, H, W) and (N, F) tensors are supported")


def numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    items = tuple(int(v) for v in value)
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def bind(node: fx.Node, parameters: Sequence[str]) -> dict[str, Any]:
    """A call's arguments by parameter name: positional ones named by `parameters`, then keywords."""
    return dict(zip(parameters, node.args, strict=False)) | dict(node.kwargs)


def flatten_args(value: Any) -> list[Any]:
    """The leaves of nested tuples and lists of call arguments."""
    if isinstance(value, tuple | list):
        items: list[Any] = []
        for v in value:
            items.extend(flatten_args(v))
        return items
    return [value]
