"""ONNX files read back into the IR, and hostile ONNX files refused without touching the machine.

The builders of hostile files here are shared with tests/service/test_onnx_uploads.py, which sends
the same files to the running service.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from onnx import ModelProto, TensorProto, helper

from lpnet.arch import onnx_io
from lpnet.arch.from_torch import network_from_module, network_from_torchvision, torchvision_model
from lpnet.arch.ir import Network
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import (
    ExternalDataRefused,
    InvalidArchitecture,
    LpnetError,
    OnnxLimitExceeded,
    UnsupportedOperator,
    UnsupportedOpset,
)
from service.testing.tiny import TinyResNet
from tests.lpnet import onnx_fixtures


def test_resnet18_onnx_has_the_same_hash_as_the_torchvision_path(resnet18_ir: Network) -> None:
    data = export_onnx(torchvision_model("resnet18"), resnet18_ir.input_shape)
    from_onnx = network_from_onnx(data)
    assert from_onnx.content_hash == resnet18_ir.content_hash
    assert len(from_onnx.layers) == len(resnet18_ir.layers)


def test_silu_and_squeeze_excitation_survive_onnx() -> None:
    net = network_from_torchvision("efficientnet_b0", (1, 3, 128, 128))
    data = export_onnx(torchvision_model("efficientnet_b0"), net.input_shape)
    assert network_from_onnx(data).content_hash == net.content_hash


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


def _graph_with(node: onnx.NodeProto) -> bytes:
    return conv_model(node).SerializeToString()


def test_unsupported_onnx_op_is_named_with_its_node() -> None:
    data = _graph_with(helper.make_node("LpNormalization", ["c"], ["y"], name="l2_norm", axis=1))
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(data)
    assert (info.value.op, info.value.layer) == ("LpNormalization", "l2_norm")


def test_symbolic_batch_is_fixed_to_one() -> None:
    net = network_from_onnx(_graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu")))
    assert net.input_shape == (1, 3, 8, 8)
    assert [layer.op.value for layer in net.layers] == ["conv2d", "relu"]


def test_garbage_bytes_are_rejected_clearly() -> None:
    with pytest.raises(InvalidArchitecture, match="ONNX"):
        network_from_onnx(b"\x00\x01 definitely not protobuf")


# Hostile files -----------------------------------------------------------------------------------

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


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PlantedFiles:
    files = plant_secret_files(tmp_path)
    monkeypatch.chdir(files.work)
    return files


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


def assert_nothing_read(error: LpnetError, opened: list[Path]) -> None:
    """Neither the planted bytes nor the float they hold show in `error`, and no planted file was opened."""
    text = f"{error.message} {error.details}"
    assert MARKER.decode() not in text
    assert str(SECRET_FLOAT) not in text and "4242" not in text
    assert opened == []


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


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("place", sorted(EXTERNAL_DATA_MODELS))
def test_external_data_is_refused_without_opening_the_file(
    planted: PlantedFiles, place: str, location: str
) -> None:
    data = EXTERNAL_DATA_MODELS[place](planted.location(location)).SerializeToString()
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data)
    assert info.value.code == "external_data_refused"
    tensor = info.value.details["tensor"]
    assert tensor == ("b" if place == "if_branch" else "high")
    assert f"tensor {tensor!r}" in info.value.message
    assert_nothing_read(info.value, opened)


def test_external_data_entries_without_the_location_flag_are_refused(planted: PlantedFiles) -> None:
    data = clip_model(external_tensor("high", "secret.bin", flagged=False), as_constant=False)
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data.SerializeToString())
    assert "tensor 'high' (initializer of graph 'g')" in info.value.message
    assert_nothing_read(info.value, opened)


def _message_fields_reaching_tensors() -> list[FieldDescriptor]:
    """Every message field, among the types a ModelProto can hold, through which a TensorProto is reached."""
    types: dict[str, Descriptor] = {}
    queue = deque([ModelProto.DESCRIPTOR])
    while queue:
        message = queue.popleft()
        if message.full_name not in types:
            types[message.full_name] = message
            queue.extend(f.message_type for f in message.fields if f.message_type is not None)
    reaching = {TensorProto.DESCRIPTOR.full_name}
    grown = True
    while grown:
        before = len(reaching)
        for message in types.values():
            if any(
                f.message_type is not None and f.message_type.full_name in reaching for f in message.fields
            ):
                reaching.add(message.full_name)
        grown = len(reaching) > before
    return [
        field
        for message in types.values()
        for field in message.fields
        if field.message_type is not None and field.message_type.full_name in reaching
    ]


def _shortest_path(start: Descriptor, goal: Descriptor) -> list[FieldDescriptor]:
    paths: dict[str, list[FieldDescriptor]] = {start.full_name: []}
    queue = deque([start])
    while queue:
        message = queue.popleft()
        if message.full_name == goal.full_name:
            return paths[message.full_name]
        for field in message.fields:
            target = field.message_type
            if target is not None and target.full_name not in paths:
                paths[target.full_name] = [*paths[message.full_name], field]
                queue.append(target)
    raise AssertionError(f"no path from {start.full_name} to {goal.full_name}")


def _model_with_external_tensor_through(field: FieldDescriptor) -> ModelProto:
    """A model with one external-data tensor, placed at the end of a path that uses `field`."""
    path = [
        *_shortest_path(ModelProto.DESCRIPTOR, field.containing_type),
        field,
        *_shortest_path(field.message_type, TensorProto.DESCRIPTOR),
    ]
    model = ModelProto()
    message = model
    for step in path:
        message = getattr(message, step.name).add() if step.is_repeated else getattr(message, step.name)
    message.CopyFrom(external_tensor("planted", "secret.bin"))
    return model


@pytest.mark.parametrize(
    "field", _message_fields_reaching_tensors(), ids=lambda f: f"{f.containing_type.name}.{f.name}"
)
def test_external_data_is_refused_wherever_onnx_can_hold_a_tensor(
    planted: PlantedFiles, field: FieldDescriptor
) -> None:
    """Every place of the protobuf schema that can hold a tensor (subgraphs, functions, training ...)."""
    data = _model_with_external_tensor_through(field).SerializeToString()
    with opened_files(planted.secrets) as opened, pytest.raises(ExternalDataRefused) as info:
        network_from_onnx(data)
    assert info.value.details["tensor"] == "planted"
    assert_nothing_read(info.value, opened)


def test_a_hundred_thousand_nodes_are_refused_before_shape_inference() -> None:
    data = relu_chain(100_000)
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 5.0
    assert info.value.details == {"limit": "nodes", "found": 100_000, "maximum": onnx_io.MAX_NODES}
    assert "100000" in info.value.message and str(onnx_io.MAX_NODES) in info.value.message


def test_a_billion_channels_are_refused_at_once() -> None:
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(relu_chain(2, channels=10**9))
    assert time.perf_counter() - started < 5.0
    assert info.value.details == {"limit": "channels", "found": 10**9, "maximum": onnx_io.MAX_CHANNELS}
    assert "'x'" in info.value.message


def test_tensor_limits_apply_to_inferred_shapes_and_constants() -> None:
    # Weights without data: shape inference reads only their dims, and a file declares any dims it likes.
    weight = TensorProto(name="wide", data_type=TensorProto.FLOAT, dims=[10**9, 4, 1, 1])
    wide = conv_model(
        helper.make_node("Conv", ["c", "wide"], ["y"], name="wide_conv", kernel_shape=[1, 1]),
        initializers=[weight],
    )
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(wide.SerializeToString())
    assert info.value.details["limit"] == "tensor_elements" and info.value.details["found"] == 4 * 10**9
    assert "tensor 'wide' (initializer of graph 'g')" in info.value.message
    weight.dims[:] = [10**6, 4, 1, 1]
    million_channels = conv_model(
        helper.make_node("Conv", ["c", "wide"], ["y"], name="wide_conv", kernel_shape=[1, 1]),
        initializers=[weight],
    )
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(million_channels.SerializeToString())
    assert info.value.details == {"limit": "channels", "found": 10**6, "maximum": onnx_io.MAX_CHANNELS}
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(relu_model(image_input(shape=(1, 3, 9000, 8))))
    assert info.value.details == {"limit": "spatial_size", "found": 9000, "maximum": onnx_io.MAX_SPATIAL}


def _nested_ifs(depth: int) -> onnx.GraphProto:
    """A graph with an If whose then-branch holds an If ... `depth` levels down."""
    nodes = []
    if depth:
        empty = helper.make_graph([], "empty", [], [])
        nodes = [
            helper.make_node("If", ["cond"], ["b"], then_branch=_nested_ifs(depth - 1), else_branch=empty)
        ]
    return helper.make_graph(
        nodes, f"level{depth}", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [])]
    )


def _too_many_tensors() -> ModelProto:
    initializers = [
        helper.make_tensor(f"t{i}", TensorProto.FLOAT, [], [0.0]) for i in range(onnx_io.MAX_TENSORS + 1)
    ]
    return conv_model(helper.make_node("Relu", ["c"], ["y"]), initializers=initializers)


def _too_many_values() -> ModelProto:
    return conv_model(helper.make_node("Sum", ["c"] * onnx_io.MAX_VALUES, ["y"], name="sum"))


def _too_many_attributes() -> ModelProto:
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    relu.attribute.extend(helper.make_attribute(f"a{i}", i) for i in range(onnx_io.MAX_ATTRIBUTES + 1))
    return conv_model(relu)


def _too_many_graphs() -> ModelProto:
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    empty = helper.make_graph([], "empty", [], [])
    relu.attribute.append(helper.make_attribute("bodies", [empty] * (onnx_io.MAX_GRAPHS + 1)))
    return conv_model(relu)


def _too_deep() -> ModelProto:
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    deep = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="deep",
        then_branch=_nested_ifs(onnx_io.MAX_SUBGRAPH_DEPTH),
        else_branch=_nested_ifs(0),
    )
    return conv_model(deep, initializers=[cond])


@pytest.mark.parametrize(
    ("limit", "maximum", "build"),
    [
        ("tensors", onnx_io.MAX_TENSORS, _too_many_tensors),
        ("values", onnx_io.MAX_VALUES, _too_many_values),
        ("attributes", onnx_io.MAX_ATTRIBUTES, _too_many_attributes),
        ("graphs", onnx_io.MAX_GRAPHS, _too_many_graphs),
        ("subgraph_depth", onnx_io.MAX_SUBGRAPH_DEPTH, _too_deep),
    ],
)
def test_count_limits_are_named_with_the_value_found(
    limit: str, maximum: int, build: Callable[[], ModelProto]
) -> None:
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(build().SerializeToString())
    assert info.value.details["limit"] == limit and info.value.details["maximum"] == maximum
    assert info.value.details["found"] > maximum
    assert f"{info.value.details['found']}" in info.value.message and f"({limit})" in info.value.message


def test_more_than_one_input_is_refused_with_their_names() -> None:
    with pytest.raises(InvalidArchitecture) as info:
        network_from_onnx(relu_model(image_input("image"), image_input("mask")))
    assert info.value.details == {"inputs": ["image", "mask"], "count": 2}


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (image_input(elem_type=TensorProto.INT64), {"elem_type": "INT64"}),
        (image_input(elem_type=TensorProto.STRING), {"elem_type": "STRING"}),
        (image_input(shape=(1, 3)), {"rank": 2}),
        (
            helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            {"type": "sequence_type"},
        ),
    ],
)
def test_an_input_that_is_not_a_float_image_is_refused(
    value: onnx.ValueInfoProto, detail: dict[str, object]
) -> None:
    with pytest.raises(InvalidArchitecture) as info:
        network_from_onnx(relu_model(value))
    assert info.value.details == {"input": "x", **detail}
    assert "'x'" in info.value.message


@pytest.mark.parametrize(
    ("opsets", "domain", "version"),
    [
        ((("ai.onnx", 17), ("ai.onnx", 18)), "ai.onnx", 18),
        ((("", 17), ("com.microsoft", 1)), "com.microsoft", 1),
        ((), "", None),
    ],
)
def test_unsupported_opsets_are_refused_by_name(
    opsets: tuple[tuple[str, int], ...], domain: str, version: int | None
) -> None:
    with pytest.raises(UnsupportedOpset) as info:
        network_from_onnx(with_opsets(*opsets))
    assert info.value.details == {"domain": domain, "version": version}
    assert (domain or "ai.onnx") in info.value.message


def test_default_domain_opsets_from_7_to_21_are_read_and_others_refused() -> None:
    for version in (onnx_io.MIN_OPSET, 13, onnx_io.MAX_OPSET):
        net = network_from_onnx(with_opsets(("", version)))
        assert [layer.op.value for layer in net.layers] == ["conv2d", "relu"]
    for version in (onnx_io.MIN_OPSET - 1, onnx_io.MAX_OPSET + 1):
        with pytest.raises(UnsupportedOpset) as info:
            network_from_onnx(with_opsets(("", version)))
        assert info.value.details == {"domain": "", "version": version}
        assert f"'ai.onnx' version {version}" in info.value.message and "7 to 21" in info.value.message


def test_truncated_files_are_refused_by_what_is_missing() -> None:
    data = tiny_onnx()
    # A model's fields are written in field order: ..., graph, opset_import. Cutting the file where a
    # field ends leaves a shorter model that parses; cutting inside one does not parse.
    model = onnx.load_from_string(data)
    del model.opset_import[:]
    without_opsets = model.SerializeToString()
    model.ClearField("graph")
    without_graph = model.SerializeToString()
    assert data.startswith(without_opsets) and data.startswith(without_graph)
    with pytest.raises(InvalidArchitecture, match="not a readable ONNX model"):
        network_from_onnx(data[: len(data) // 2])
    with pytest.raises(InvalidArchitecture, match="holds no graph"):
        network_from_onnx(without_graph)
    with pytest.raises(UnsupportedOpset, match="imports no version"):
        network_from_onnx(without_opsets)


def test_empty_bytes_are_not_a_model() -> None:
    with pytest.raises(InvalidArchitecture, match="no graph"):
        network_from_onnx(b"")


def _renamed(data: bytes, graph_name: str) -> bytes:
    model = onnx.load_from_string(data)
    model.graph.name = graph_name
    return model.SerializeToString()


def _bad_clip_bound(bound: TensorProto) -> bytes:
    return clip_model(bound, as_constant=False).SerializeToString()


@pytest.mark.parametrize(
    ("data", "error", "names"),
    [
        pytest.param(
            string_group_model(),
            InvalidArchitecture,
            ("group", "grouped", "INT", "STRING"),
            id="attribute of the wrong type",
        ),
        pytest.param(
            _graph_with(helper.make_node("Conv", ["c", "w"], ["y"], name="no_kernel")),
            UnsupportedOperator,
            ("kernel_shape",),
            id="conv without kernel_shape",
        ),
        pytest.param(
            _graph_with(helper.make_node("Loop", [], ["y"], name="loop")),
            UnsupportedOperator,
            ("Loop", "loop"),
            id="loop without inputs (crashes onnx shape inference)",
        ),
        pytest.param(
            _graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu", domain="com.example")),
            UnsupportedOperator,
            ("com.example.Relu",),
            id="operator of another domain",
        ),
        pytest.param(
            _graph_with(helper.make_node("Relu", ["c"], [], name="silent")),
            InvalidArchitecture,
            ("silent", "no output"),
            id="node without output",
        ),
        pytest.param(
            _bad_clip_bound(helper.make_tensor("high", TensorProto.FLOAT, [2], [6.0, 6.0])),
            UnsupportedOperator,
            ("high", "single number"),
            id="clip bound with two values",
        ),
        pytest.param(
            _bad_clip_bound(TensorProto(name="high", data_type=TensorProto.FLOAT, raw_data=b"\x00" * 5)),
            InvalidArchitecture,
            ("high", "cannot be read"),
            id="clip bound with data not fitting its type",
        ),
        pytest.param(
            _bad_clip_bound(TensorProto(name="high", data_type=999, raw_data=b"\x00" * 4)),
            InvalidArchitecture,
            ("high", "cannot be read"),
            id="clip bound of an unknown type",
        ),
        pytest.param(
            _graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu")).replace(b"relu", b"rel\xff"),
            InvalidArchitecture,
            ("UTF-8",),
            id="name that is not UTF-8",
        ),
        pytest.param(
            _renamed(relu_chain(2), "c" * 201),
            InvalidArchitecture,
            ("name",),
            id="graph name too long for a network name",
        ),
    ],
)
def test_malformed_files_become_domain_errors(
    data: bytes, error: type[LpnetError], names: tuple[str, ...]
) -> None:
    with pytest.raises(error) as info:
        network_from_onnx(data)
    for name in names:
        assert name in info.value.message


# Files from other toolchains: constants to fold, older opsets, other ways to write the same layer -----

FOLDING_OPSETS = (9, 11, 13, 17, 21)  # ConstantOfShape, which Caffe2 exports use, exists from opset 9
EXPORT_OPSETS = (7, 9, 11, 13, 17, 21)


@pytest.mark.parametrize("opset", FOLDING_OPSETS)
def test_weights_computed_from_constants_give_the_ir_of_plain_weights(opset: int) -> None:
    folded = network_from_onnx(onnx_fixtures.plain_weights_model(opset).SerializeToString())
    computed = network_from_onnx(onnx_fixtures.caffe2_style_model(opset).SerializeToString())
    assert computed.content_hash == folded.content_hash
    module = network_from_module(onnx_fixtures.stem_and_classifier(), onnx_fixtures.IMAGE_SHAPE)
    assert computed.content_hash == module.content_hash
    assert [layer.op.value for layer in computed.layers] == [
        "conv2d",
        "batchnorm2d",
        "relu",
        "adaptive_avgpool2d",
        "flatten",
        "linear",
    ]
    assert computed.by_name["conv"].bias and computed.by_name["fc"].bias


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
def test_shape_arithmetic_of_a_dynamic_batch_export_is_folded(opset: int) -> None:
    shape = (1, 3, 4, 4)
    data = export_onnx(onnx_fixtures.FlattenByView(), shape, opset=opset, dynamic_batch=True)
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    network = network_from_onnx(data)
    assert network.content_hash == network_from_module(onnx_fixtures.FlattenByFunction(), shape).content_hash
    assert [layer.op.value for layer in network.layers] == [
        "conv2d",
        "batchnorm2d",
        "relu6",
        "flatten",
        "linear",
    ]


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
def test_means_over_height_and_width_are_pooling_layers(opset: int) -> None:
    shape = (1, 3, 4, 4)
    data = export_onnx(onnx_fixtures.MeanPooled(), shape, opset=opset, dynamic_batch=True)
    assert "ReduceMean" in {node.op_type for node in onnx.load_from_string(data).graph.node}
    expected = network_from_module(onnx_fixtures.AdaptivePooled(), shape)
    assert network_from_onnx(data).content_hash == expected.content_hash


@pytest.mark.parametrize("opset", [13, 18, 21])
@pytest.mark.parametrize("axes", [(2, 3), (-1, -2)])
@pytest.mark.parametrize("keepdims", [True, False])
def test_reduce_mean_with_axes_as_attribute_or_input(
    opset: int, axes: tuple[int, ...], keepdims: bool
) -> None:
    data = onnx_fixtures.reduce_mean_model(opset, axes, keepdims=keepdims).SerializeToString()
    network = network_from_onnx(data)
    assert (
        network.content_hash
        == network_from_onnx(onnx_fixtures.global_pool_model(opset).SerializeToString()).content_hash
    )
    assert (
        network.content_hash
        == network_from_module(onnx_fixtures.pooled_classifier(), (1, 3, 8, 8)).content_hash
    )
    pooled = network.by_name["mean"]
    assert (pooled.op.value, pooled.out_hw, pooled.out_channels) == ("adaptive_avgpool2d", (1, 1), 8)


@pytest.mark.parametrize(
    ("axes", "shown"), [((1, 2, 3), "axes [1, 2, 3]"), ((3,), "axes [3]"), (None, "all axes")]
)
def test_reduce_mean_over_other_axes_is_refused_naming_them(axes: tuple[int, ...] | None, shown: str) -> None:
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(onnx_fixtures.mean_output_model(axes).SerializeToString())
    assert (info.value.op, info.value.layer) == ("ReduceMean", "mean")
    assert shown in info.value.message


def test_sum_of_tensors_is_one_add_layer() -> None:
    network = network_from_onnx(onnx_fixtures.sum_model("a", "b", "c").SerializeToString())
    total = network.by_name["total"]
    assert total.op.value == "add" and sorted(total.inputs) == ["conv_a", "conv_b", "conv_c"]
    pair = network_from_onnx(onnx_fixtures.sum_model("a", "b").SerializeToString())
    added = network_from_onnx(onnx_fixtures.sum_model("a", "b", op_type="Add").SerializeToString())
    assert pair.content_hash == added.content_hash
    single = network_from_onnx(onnx_fixtures.sum_model("a").SerializeToString())
    assert [layer.op.value for layer in single.layers] == ["conv2d"] * 3


def test_sum_with_a_constant_and_max_of_tensors_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedOperator, match="not constants") as info:
        network_from_onnx(onnx_fixtures.sum_model("a", "k").SerializeToString())
    assert (info.value.op, info.value.layer) == ("Sum", "total")
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(onnx_fixtures.sum_model("a", "b", op_type="Max").SerializeToString())
    assert (info.value.op, info.value.layer) == ("Max", "total")


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
@pytest.mark.parametrize("model_name", ["squeezenet1_1", "mobilenet_v3_small"])
def test_torchvision_exports_at_every_opset_match_the_traced_module(model_name: str, opset: int) -> None:
    """Each opset's way of writing a layer reads back as that layer.

    Before opset 10 MaxPool's ceil_mode is written as padding at the end; before 14 HardSwish is
    written as x * HardSigmoid(x).
    """
    module = torchvision_model(model_name)
    data = export_onnx(module, (1, 3, 64, 64), opset=opset, dynamic_batch=True)
    expected = network_from_module(module, (2, 3, 64, 64))
    assert network_from_onnx(data, batch_size=2).content_hash == expected.content_hash


def test_symbolic_batch_takes_the_batch_size_and_a_fixed_batch_is_kept() -> None:
    dynamic = onnx_fixtures.plain_weights_model(17)
    network = network_from_onnx(dynamic.SerializeToString(), batch_size=4)
    assert network.input_shape == (4, 3, 16, 16)
    fixed = onnx_fixtures.plain_weights_model(17)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert network_from_onnx(fixed.SerializeToString(), batch_size=4).input_shape[0] == 2
    exported = export_onnx(onnx_fixtures.FlattenByView(), (1, 3, 4, 4), dynamic_batch=True)
    assert network_from_onnx(exported, batch_size=8).input_shape == (8, 3, 4, 4)


@pytest.mark.parametrize("batch_size", [0, -1, 1025])
def test_a_batch_size_out_of_range_is_refused(batch_size: int) -> None:
    with pytest.raises(InvalidArchitecture, match="batch_size") as info:
        network_from_onnx(onnx_fixtures.plain_weights_model(17).SerializeToString(), batch_size=batch_size)
    assert info.value.details == {"batch_size": batch_size}


@pytest.mark.parametrize(
    "dims",
    [[10**12], [2**16, 2**16], [2**31 + 1]],
    ids=["a trillion elements", "2^32 elements in two dims", "a dimension above the limit"],
)
def test_a_huge_constant_of_shape_is_refused_before_it_is_filled(dims: list[int]) -> None:
    data = onnx_fixtures.constant_of_shape_model(dims).SerializeToString()
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 5.0
    assert info.value.details["limit"] == "tensor_elements"
    assert info.value.details["maximum"] == onnx_io.MAX_TENSOR_ELEMENTS
    assert "constant 'huge' computed by node 'huge'" in info.value.message


def test_a_large_constant_within_the_limits_keeps_its_shape_and_is_never_filled() -> None:
    # 2^28 float32 elements would take 1 GiB if computed.
    data = onnx_fixtures.constant_of_shape_model([2**14, 2**14]).SerializeToString()
    tracemalloc.start()
    try:
        network = network_from_onnx(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [layer.op.value for layer in network.layers] == ["conv2d"]
    assert peak < 64 * 2**20


def _constant(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        name=name,
        value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
    )


@pytest.mark.parametrize(
    "nodes",
    [
        [
            _constant("n", [10**6]),
            helper.make_node("Mul", ["n", "n"], ["size"], name="square"),
            helper.make_node("ConstantOfShape", ["size"], ["huge"], name="huge"),
        ],
        [
            _constant("one", [1]),
            _constant("size", [10**12]),
            helper.make_node("Expand", ["one", "size"], ["huge"], name="huge"),
        ],
        [
            _constant("one", [1]),
            _constant("repeats", [10**12]),
            helper.make_node("Tile", ["one", "repeats"], ["huge"], name="huge"),
        ],
    ],
    ids=["ConstantOfShape of a computed shape", "Expand", "Tile"],
)
def test_computed_constants_are_checked_against_the_limits_before_evaluation(
    nodes: list[onnx.NodeProto],
) -> None:
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(onnx_fixtures.constant_nodes_model(*nodes).SerializeToString())
    assert time.perf_counter() - started < 5.0
    assert info.value.details["limit"] == "tensor_elements" and info.value.details["found"] == 10**12
    assert "node 'huge'" in info.value.message


@pytest.mark.parametrize(
    ("nodes", "error", "names"),
    [
        pytest.param(
            [
                _constant("row", [1, 2, 3]),
                _constant("index", [7]),
                helper.make_node("Gather", ["row", "index"], ["picked"], name="pick"),
            ],
            InvalidArchitecture,
            ("pick", "Gather", "shape inference failed", "indices must be in"),
            id="index out of range",
        ),
        pytest.param(
            [
                _constant("flat", [1, 2, 3]),
                _constant("shape", [2, 2]),
                helper.make_node("Reshape", ["flat", "shape"], ["square"], name="square"),
            ],
            InvalidArchitecture,
            ("square", "Reshape", "could not be evaluated", "cannot reshape"),
            id="reshape to a shape of another size",
        ),
        pytest.param(
            [_constant("k", [1]), helper.make_node("Relu", ["k"], ["r"], name="relu_of_constant")],
            UnsupportedOperator,
            ("Relu", "relu_of_constant", "computing only on constants"),
            id="operator that is not folded",
        ),
        pytest.param(
            [
                helper.make_node("Shape", ["x"], ["s"], name="shape"),
                helper.make_node("Gather", ["x", "s"], ["g"], name="gather"),
            ],
            UnsupportedOperator,
            ("Gather", "gather"),
            id="shape arithmetic applied to the image",
        ),
    ],
)
def test_constant_computations_that_cannot_be_folded_are_named(
    nodes: list[onnx.NodeProto], error: type[LpnetError], names: tuple[str, ...]
) -> None:
    with pytest.raises(error) as info:
        network_from_onnx(onnx_fixtures.constant_nodes_model(*nodes).SerializeToString())
    for name in names:
        assert name in info.value.message


def test_float_arithmetic_on_constants_may_overflow_or_divide_by_zero() -> None:
    # Weights computed from constants are folded but never read: inf in one does not fail the file.
    big = helper.make_tensor("big", TensorProto.FLOAT, [2], [3e38, 1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [2], [0.0, 0.0])
    nodes = [
        helper.make_node("Add", ["big", "big"], ["infinite"], name="overflow"),
        helper.make_node("Div", ["big", "zero"], ["ratio"], name="ratio"),
    ]
    data = onnx_fixtures.constant_nodes_model(*nodes, initializers=[big, zero]).SerializeToString()
    assert [layer.op.value for layer in network_from_onnx(data).layers] == ["conv2d"]


def test_folding_more_nodes_than_the_limit_is_refused_in_bounded_time() -> None:
    count = onnx_io.MAX_FOLDED_NODES + 1
    names = ["k0", *(f"k{i}" for i in range(1, count + 1))]
    nodes = [helper.make_node("Identity", [names[i]], [names[i + 1]], name=f"n{i}") for i in range(count)]
    first = helper.make_tensor("k0", TensorProto.FLOAT, [4], [1.0] * 4)
    data = onnx_fixtures.constant_nodes_model(*nodes, initializers=[first]).SerializeToString()
    started = time.perf_counter()
    with pytest.raises(OnnxLimitExceeded) as info:
        network_from_onnx(data)
    assert time.perf_counter() - started < 10.0
    assert info.value.details == {
        "limit": "folded_nodes",
        "found": count,
        "maximum": onnx_io.MAX_FOLDED_NODES,
    }


def test_per_activation_batch_norm_of_old_opsets_is_refused_naming_the_opset() -> None:
    model = onnx_fixtures.plain_weights_model(7)
    (bn,) = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    bn.attribute.append(helper.make_attribute("spatial", 0))
    with pytest.raises(UnsupportedOperator, match="spatial=0") as info:
        network_from_onnx(model.SerializeToString())
    assert (info.value.op, info.value.layer) == ("BatchNormalization", "bn")
    assert "opset 7" in info.value.message


@pytest.mark.slow
def test_resnet50_export_converts_fast_without_copying_its_weights() -> None:
    module = torchvision_model("resnet50")
    data = export_onnx(module, (1, 3, 224, 224), dynamic_batch=True)
    del module
    tracemalloc.start()
    try:
        started = time.perf_counter()
        network = network_from_onnx(data, batch_size=2)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert network.input_shape[0] == 2 and len(network.layers) == 175
    assert elapsed < 10.0
    # The file holds about 100 MB of weights; serialising it for shape inference would copy them all.
    assert peak < len(data) // 4
