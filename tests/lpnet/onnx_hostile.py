"""Hostile and malformed ONNX files, built with onnx.helper, and a watch on the files a test plants.

Shared by the reader's tests (tests/lpnet/test_onnx_io_*.py) and tests/service/test_onnx_uploads.py,
which sends the same files to the running service.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from onnx import ModelProto, TensorProto, helper

from lpnet.arch.onnx_io import export_onnx
from service.testing.tiny import TinyResNet


def conv_model(
    *nodes: onnx.NodeProto,
    initializers: Sequence[TensorProto] = (),
    inputs: Sequence[onnx.ValueInfoProto] | None = None,
    opset: int = 17,
) -> ModelProto:
    """x (N, 3, 8, 8) -> 1x1 Conv "conv" -> c, then `nodes`, which end in the output y."""
    conv_w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.1] * 12)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]), *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])] if inputs is None else inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[conv_w, *initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def graph_with(node: onnx.NodeProto) -> bytes:
    """The bytes of `conv_model` followed by `node`."""
    return conv_model(node).SerializeToString()


SECRET_FLOAT = 4242.0
MARKER = b"lpnet-test-server-secret-7f3a"


@dataclass(frozen=True)
class PlantedFiles:
    """Files of "the server" that a hostile model points at; tests run with `work` as working directory."""

    work: Path
    secrets: tuple[Path, ...]

    def location(self, kind: str) -> str:
        """An external-data location reaching one of the files: relative, through .., or absolute."""
        return {"relative": "secret.bin", "parent": "../secret.bin", "absolute": str(self.secrets[1])}[kind]


LOCATIONS = ("relative", "parent", "absolute")


def plant_secret_files(root: Path) -> PlantedFiles:
    """Two files starting with a float32 a Clip bound would show, then a marker no response may carry."""
    work = root / "server" / "work"
    work.mkdir(parents=True)
    secrets = (work / "secret.bin", work.parent / "secret.bin")
    for secret in secrets:
        secret.write_bytes(struct.pack("<f", SECRET_FLOAT) + MARKER)
    return PlantedFiles(work, secrets)


IN_OPEN = 0x20  # inotify: the file was opened


@contextmanager
def opened_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Record which of `paths` anything opens inside the block, Python or C code alike (Linux inotify).

    The list is filled when the block ends.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("watching file opens needs Linux inotify")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    try:
        watched = {}
        for path in paths:
            watch = libc.inotify_add_watch(fd, os.fsencode(path), IN_OPEN)
            if watch < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {path}")
            watched[watch] = path
        opened: list[Path] = []
        yield opened
        try:
            events = os.read(fd, 65536)
        except BlockingIOError:
            events = b""
        offset = 0
        while offset < len(events):
            watch, _mask, _cookie, name_length = struct.unpack_from("iIII", events, offset)
            opened.append(watched[watch])
            offset += 16 + name_length
    finally:
        os.close(fd)


def external_tensor(name: str, location: str, *, flagged: bool = True) -> TensorProto:
    """A float scalar whose 4 bytes live at `location` (onnx's external-data fields).

    With `flagged=False` only the `external_data` entries are set, not `data_location`.
    """
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT)
    if flagged:
        tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def clip_model(high: TensorProto, *, as_constant: bool) -> ModelProto:
    """conv -> Clip(c, 0, high) -> y, `high` (a tensor named "high") an initializer or a Constant's value."""
    low = helper.make_tensor("low", TensorProto.FLOAT, [], [0.0])
    clip = helper.make_node("Clip", ["c", "low", "high"], ["y"], name="clip")
    if as_constant:
        return conv_model(
            helper.make_node("Constant", [], ["high"], name="high", value=high), clip, initializers=[low]
        )
    return conv_model(clip, initializers=[low, high])


def if_branch_model(location: str) -> ModelProto:
    """A graph whose If node has a branch holding a Constant with external data."""
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], name="branch", value=external_tensor("b", location))],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [])],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    choose = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch, else_branch=branch)
    return conv_model(choose, initializers=[cond])


# Models with external data in realistic places, by name: each takes the data's location.
EXTERNAL_DATA_MODELS = {
    "initializer": lambda location: clip_model(external_tensor("high", location), as_constant=False),
    "constant": lambda location: clip_model(external_tensor("high", location), as_constant=True),
    "if_branch": if_branch_model,
}


def relu_chain(count: int, channels: int = 3) -> bytes:
    """x (1, channels, 8, 8) through `count` Relu nodes."""
    names = ["x", *(f"v{i}" for i in range(1, count)), "y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]], name=f"r{i}") for i in range(count)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def relu_model(*inputs: onnx.ValueInfoProto) -> bytes:
    """The inputs added together (one input: Relu of it) -> y."""
    names = [value.name for value in inputs]
    node = helper.make_node("Sum" if len(names) > 1 else "Relu", names, ["y"], name="op")
    graph = helper.make_graph(
        [node], "g", list(inputs), [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def image_input(
    name: str = "x", elem_type: int = TensorProto.FLOAT, shape: Sequence[int] = (1, 3, 8, 8)
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def with_opsets(*opsets: tuple[str, int]) -> bytes:
    model = conv_model(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets)
    return model.SerializeToString()


def tiny_onnx() -> bytes:
    return export_onnx(TinyResNet(width=8).eval(), (1, 3, 16, 16))


def string_group_model() -> bytes:
    """A Conv whose `group` attribute is a string."""
    conv = helper.make_node("Conv", ["c", "w"], ["y"], name="grouped", kernel_shape=[1, 1], group="two")
    return conv_model(conv).SerializeToString()


# Files the reader must refuse, by name: the bytes and the error code they get.
def refused_files() -> dict[str, tuple[bytes, str]]:
    data = tiny_onnx()
    return {
        "a billion channels": (relu_chain(2, channels=10**9), "onnx_limit_exceeded"),
        "two inputs": (relu_model(image_input("a"), image_input("b")), "invalid_architecture"),
        "integer input": (relu_model(image_input(elem_type=TensorProto.INT64)), "invalid_architecture"),
        "rank-2 input": (relu_model(image_input(shape=(1, 3))), "invalid_architecture"),
        "opset 22": (with_opsets(("", 22)), "unsupported_opset"),
        "ml domain": (with_opsets(("", 17), ("ai.onnx.ml", 3)), "unsupported_opset"),
        "truncated": (data[: len(data) // 2], "invalid_architecture"),
        "string group": (string_group_model(), "invalid_architecture"),
    }
