"""Files that are not a usable ONNX image model: each refused with a domain error naming what is wrong."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from lpnet.arch.onnx_io import limits, network_from_onnx
from lpnet.errors import (
    InvalidArchitecture,
    LpnetError,
    UnsupportedOperator,
    UnsupportedOpset,
)
from tests.lpnet import onnx_fixtures
from tests.lpnet.onnx_hostile import (
    clip_model,
    graph_with,
    image_input,
    relu_chain,
    relu_model,
    string_group_model,
    tiny_onnx,
    with_opsets,
)


def test_unsupported_onnx_op_is_named_with_its_node() -> None:
    data = graph_with(helper.make_node("LpNormalization", ["c"], ["y"], name="l2_norm", axis=1))
    with pytest.raises(UnsupportedOperator) as info:
        network_from_onnx(data)
    assert (info.value.op, info.value.layer) == ("LpNormalization", "l2_norm")


def test_garbage_bytes_are_rejected_clearly() -> None:
    with pytest.raises(InvalidArchitecture, match="ONNX"):
        network_from_onnx(b"\x00\x01 definitely not protobuf")


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
    for version in (limits.MIN_OPSET, 13, limits.MAX_OPSET):
        net = network_from_onnx(with_opsets(("", version)))
        assert [layer.op.value for layer in net.layers] == ["conv2d", "relu"]
    for version in (limits.MIN_OPSET - 1, limits.MAX_OPSET + 1):
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
            graph_with(helper.make_node("Conv", ["c", "w"], ["y"], name="no_kernel")),
            UnsupportedOperator,
            ("kernel_shape",),
            id="conv without kernel_shape",
        ),
        pytest.param(
            graph_with(helper.make_node("Loop", [], ["y"], name="loop")),
            UnsupportedOperator,
            ("Loop", "loop"),
            id="loop without inputs (crashes onnx shape inference)",
        ),
        pytest.param(
            graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu", domain="com.example")),
            UnsupportedOperator,
            ("com.example.Relu",),
            id="operator of another domain",
        ),
        pytest.param(
            graph_with(helper.make_node("Relu", ["c"], [], name="silent")),
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
            graph_with(helper.make_node("Relu", ["c"], ["y"], name="relu")).replace(b"relu", b"rel\xff"),
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


@pytest.mark.parametrize("batch_size", [0, -1, 1025])
def test_a_batch_size_out_of_range_is_refused(batch_size: int) -> None:
    with pytest.raises(InvalidArchitecture, match="batch_size") as info:
        network_from_onnx(onnx_fixtures.plain_weights_model(17).SerializeToString(), batch_size=batch_size)
    assert info.value.details == {"batch_size": batch_size}
