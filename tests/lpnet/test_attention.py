"""Transformers in the IR: ViT's token sequences and attention, Swin's shifted windows and patch
merging, MaxViT's window and grid attention.

Traced from tiny torchvision configurations, validated, costed (against torch's own FLOP counter
of the rebuilt module), rebuilt, grouped for pruning and read back from torch.onnx.export files
(in detail in test_onnx_io_attention.py and test_onnx_io_windows.py); the ONNX export of a rebuilt
module's attention reads back as the same network.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import onnx
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.vision_transformer import VisionTransformer

from lpnet.arch.build import build_module
from lpnet.arch.counting import layer_cost, network_cost
from lpnet.arch.from_torch import network_from_module, network_from_torchvision
from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.arch.ir import Layer, Network, Op
from lpnet.arch.onnx_io import export_onnx, network_from_onnx
from lpnet.errors import ArchitectureTooLarge, InvalidArchitecture, UnsupportedOperator
from service.api.errors import LPNET_ERROR_STATUS

SHAPE = (2, 3, 32, 32)


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


def tiny_swin(v2: bool = False) -> SwinTransformer:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=10,
        **extra,  # type: ignore[arg-type]
    ).eval()


def module_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counted_macs(module: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-accumulates of one forward pass as torch's FLOP counter sees them (flops / 2).

    Attention runs as its math decomposition, whose matrix products the counter sees.
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(torch.zeros(shape))
    return counter.get_total_flops() / 2


def test_vit_traces_into_tokens_class_token_position_embedding_attention_and_token_select() -> None:
    module = tiny_vit()
    network = network_from_module(module, SHAPE)
    counts = network.op_counts()
    assert counts["tokens"] == counts["class_token"] == counts["position_embedding"] == 1
    assert counts["attention"] == 2 and counts["token_select"] == 1
    attention = next(layer for layer in network.layers if layer.op is Op.ATTENTION)
    # 4x4 patches and the class token: 17 tokens of 32 features, all attending to each other.
    assert (attention.in_channels, attention.in_hw, attention.kernel, attention.groups) == (
        32,
        (1, 17),
        (1, 17),
        2,
    )
    assert network_cost(network).params == module_params(module)
    rebuilt = build_module(network)
    assert module_params(rebuilt) == module_params(module)
    assert rebuilt(torch.zeros(SHAPE)).shape == (2, 10)
    # The IR's MACs are what torch counts for the rebuilt module (the traced model's attention runs
    # a fused kernel the counter does not see; its published totals are checked by name below).
    assert counted_macs(rebuilt, SHAPE) == pytest.approx(network_cost(network).macs, rel=0.01)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_traces_into_shifted_window_attention_and_space_to_depth(v2: bool) -> None:
    module = tiny_swin(v2)
    network = network_from_module(module, SHAPE)
    attention = [layer for layer in network.layers if layer.op is Op.ATTENTION]
    merges = [layer for layer in network.layers if layer.op is Op.SPACE_TO_DEPTH]
    assert len(attention) == 4 and len(merges) == 1
    assert (merges[0].in_channels, merges[0].out_channels, merges[0].out_hw) == (16, 64, (4, 4))
    # Stage 1 (8x8 map): windows of 4, the second block shifted by 2. Stage 2 (4x4): one window, so
    # no shift, as torchvision computes it.
    assert [(a.in_hw, a.kernel, a.shift, a.groups) for a in attention] == [
        ((8, 8), (4, 4), (0, 0), 2),
        ((8, 8), (4, 4), (2, 2), 2),
        ((4, 4), (4, 4), (0, 0), 4),
        ((4, 4), (4, 4), (0, 0), 4),
    ]
    assert all(a.position_bias and a.bias for a in attention)
    rebuilt = build_module(network)
    assert rebuilt(torch.zeros(SHAPE)).shape == (2, 10)
    macs = network_cost(network).macs
    assert counted_macs(rebuilt, SHAPE) == pytest.approx(macs, rel=0.01)
    if not v2:  # v1's relative position bias table is what the IR counts; v2 computes it with an MLP
        assert network_cost(network).params == module_params(module)
        assert counted_macs(module, SHAPE) == pytest.approx(macs, rel=0.01)


def test_windowed_attention_pads_its_map_to_whole_windows() -> None:
    layer = Layer(
        name="a", op=Op.ATTENTION, inputs=["input"], in_channels=8, out_channels=8,
        in_hw=(5, 6), out_hw=(5, 6), kernel=(4, 4), groups=2, bias=True,
    )  # fmt: skip
    padded_positions = 8 * 8  # 5x6 padded to 8x8, four windows of 16
    assert layer_cost(layer).macs == padded_positions * (4 * 8 * 8 + 2 * 16 * 8)
    network = Network(input_shape=(1, 8, 5, 6), layers=[layer], outputs=["a"])
    assert counted_macs(build_module(network), (1, 8, 5, 6)) == pytest.approx(layer_cost(layer).macs)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"op": Op.ATTENTION, "kernel": (2, 2), "shift": (2, 0), "groups": 2}, "shift"),
        ({"op": Op.ATTENTION, "groups": 3}, "groups"),
        ({"op": Op.CONV2D, "shift": (1, 1)}, "shift"),
        ({"op": Op.CLASS_TOKEN, "out_hw": (4, 5)}, "token sequence"),
        ({"op": Op.TOKENS, "out_hw": (1, 15)}, "out_hw"),
        ({"op": Op.SPACE_TO_DEPTH, "out_hw": (4, 4), "out_channels": 32}, "out_hw"),
        ({"op": Op.SPACE_TO_DEPTH, "out_hw": (2, 2), "out_channels": 16}, re.escape("4 * in_channels")),
    ],
)
def test_invalid_transformer_layers_are_refused_naming_the_field(
    fields: dict[str, object], message: str
) -> None:
    layer = {
        "name": "x",
        "inputs": ["input"],
        "in_channels": 8,
        "out_channels": 8,
        "in_hw": [4, 4],
        "out_hw": [4, 4],
    }
    document = {"input_shape": [1, 8, 4, 4], "layers": [layer | fields], "outputs": ["x"]}
    with pytest.raises(InvalidArchitecture, match=message):
        Network.from_dict(document)


def test_transformer_networks_round_trip_through_json() -> None:
    network = network_from_module(tiny_swin(), SHAPE)
    again = Network.from_json(network.to_json())
    assert again.content_hash == network.content_hash
    shifted = next(layer for layer in network.layers if layer.shift != (0, 0))
    document = network.model_dump()
    document["layers"][network.layers.index(shifted)]["shift"] = (0, 0)
    unshifted = Network.from_dict(document)
    assert unshifted.content_hash != network.content_hash


def test_only_mlp_widths_of_a_transformer_are_prunable() -> None:
    network = network_from_module(tiny_vit(), SHAPE)
    layout = channel_layout(network)
    assert len(layout.groups) == 2  # each block's MLP hidden layer; the token stream reaches attention
    by_name = network.by_name
    for group in layout.groups:
        assert group.channels == 64
        assert all(by_name[name].op is Op.CONV2D for name in group.out_layers)
    pruned = apply_width_vector(network, [32, 16])
    assert network_cost(pruned).macs < network_cost(network).macs
    assert build_module(pruned)(torch.zeros(SHAPE)).shape == (2, 10)


# Attention layers as each transformer has them: global over a token sequence (ViT), in windows
# padded to whole windows and shifted with a position bias (Swin), in windows dilated over the map
# without biases (MaxViT's grid attention, here with a shift too).
ATTENTION_VARIANTS: dict[str, dict[str, Any]] = {
    "global": {"hw": (1, 17), "kernel": (1, 17)},
    "shifted windows": {"hw": (6, 7), "kernel": (4, 4), "shift": (2, 2), "position_bias": True},
    "dilated windows": {
        "hw": (8, 8), "kernel": (2, 2), "dilation": (4, 4), "shift": (1, 0), "bias": False,
        "position_bias": True,
    },
}  # fmt: skip


def attention_network(hw: tuple[int, int], **fields: Any) -> Network:
    """A layer norm, attention, the residual add and a second attention: the first one reads the
    normalised map channels last in the export (the exporter drops the two transposes between them),
    the second one the map channels first."""
    common = {"in_channels": 8, "out_channels": 8, "in_hw": hw, "out_hw": hw}
    attention = {"op": Op.ATTENTION, "groups": 2, "bias": True, **common, **fields}
    layers = [
        Layer(name="norm", op=Op.LAYERNORM, inputs=["input"], **common),
        Layer(name="attend", inputs=["norm"], **attention),
        Layer(name="residual", op=Op.ADD, inputs=["input", "attend"], **common),
        Layer(name="again", inputs=["residual"], **attention),
    ]
    return Network(input_shape=(2, 8, *hw), layers=layers, outputs=["again"])


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_the_onnx_export_of_a_built_attention_reads_back_as_the_same_network(variant: str) -> None:
    fields = dict(ATTENTION_VARIANTS[variant])
    network = attention_network(**fields)
    again = network_from_onnx(export_onnx(build_module(network), network.input_shape))
    assert again.content_hash == network.content_hash
    other = attention_network(**(fields | {"position_bias": not fields.get("position_bias", False)}))
    assert network_from_onnx(export_onnx(build_module(other), other.input_shape)).content_hash != (
        network.content_hash
    )


def test_a_traced_maxvit_built_and_exported_reads_back_as_itself() -> None:
    network = network_from_module(tiny_maxvit(), SHAPE)
    assert network_from_onnx(export_onnx(build_module(network), SHAPE)).content_hash == network.content_hash


def test_a_built_attention_export_differing_in_one_node_is_refused_naming_it() -> None:
    network = attention_network(**ATTENTION_VARIANTS["shifted windows"])
    model = onnx.load_from_string(export_onnx(build_module(network), network.input_shape))
    (softmax,) = [node for node in model.graph.node if node.name == "/attend/Softmax"]
    softmax.attribute[0].i = 2  # over the queries, not the keys
    with pytest.raises(UnsupportedOperator) as refused:
        network_from_onnx(model.SerializeToString())
    assert refused.value.op == "attention"
    assert "does not match at node '/attend/Softmax'" in refused.value.message
    assert LPNET_ERROR_STATUS[type(refused.value)] == 422


@pytest.mark.parametrize(
    ("name", "gmacs"), [("swin_t", 4.49), ("swin_v2_t", 4.92), ("vit_b_32", 4.41), ("maxvit_t", 5.56)]
)
def test_torchvision_transformers_convert_by_name_in_seconds(name: str, gmacs: float) -> None:
    # About 1 s on a quiet 2-core machine (bench/torchvision_coverage.py reports the figures); the
    # bound only catches a conversion gone quadratic, and leaves room for a loaded machine.
    start = time.perf_counter()
    network = network_from_torchvision(name)
    assert time.perf_counter() - start < 10.0
    assert network_cost(network).macs / 1e9 == pytest.approx(gmacs, rel=0.01)


def tiny_maxvit() -> MaxVit:
    return MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    ).eval()


def test_maxvit_traces_window_and_grid_attention_as_plain_and_dilated_windows() -> None:
    module = tiny_maxvit()
    network = network_from_module(module, SHAPE)
    attention = [layer for layer in network.layers if layer.op is Op.ATTENTION]
    # Each block: attention within 2x2 windows, then over a grid: 2x2 positions spread over the map.
    assert [(a.in_hw, a.kernel, a.dilation, a.groups) for a in attention] == [
        ((8, 8), (2, 2), (1, 1), 2),
        ((8, 8), (2, 2), (4, 4), 2),
        ((4, 4), (2, 2), (1, 1), 4),
        ((4, 4), (2, 2), (2, 2), 4),
    ]
    assert network_cost(network).params == module_params(module)
    macs = network_cost(network).macs
    rebuilt = build_module(network)
    assert rebuilt(torch.zeros(SHAPE)).shape == (2, 10)
    assert counted_macs(module, SHAPE) == pytest.approx(macs, rel=0.01)
    assert counted_macs(rebuilt, SHAPE) == pytest.approx(macs, rel=0.01)


def test_dilated_attention_attends_within_the_spread_out_windows() -> None:
    """Positions (0, 0) and (0, 2) share a dilated window of 2x2 positions 2 apart; (0, 1) does not."""
    layer = Layer(
        name="a", op=Op.ATTENTION, inputs=["input"], in_channels=4, out_channels=4,
        in_hw=(4, 4), out_hw=(4, 4), kernel=(2, 2), dilation=(2, 2), groups=1, bias=True,
    )  # fmt: skip
    module = build_module(Network(input_shape=(1, 4, 4, 4), layers=[layer], outputs=["a"]))
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4)
    changed = x.clone()
    changed[0, :, 0, 2] += 1.0
    with torch.no_grad():
        delta = (module(changed) - module(x)).abs().sum(dim=1)[0]
    assert delta[0, 0] > 1e-4 and delta[2, 2] > 1e-4
    assert delta[0, 1] == 0 and delta[1, 0] == 0


@pytest.mark.parametrize("make", [tiny_swin, tiny_maxvit])
def test_torchs_onnx_export_of_a_torchvision_transformer_reads_as_the_traced_module(
    make: Callable[[], torch.nn.Module],
) -> None:
    module = make()
    network = network_from_onnx(export_onnx(module, SHAPE, opset=17))
    assert network.content_hash == network_from_module(module, SHAPE).content_hash


def test_an_attention_whose_score_tensor_is_beyond_the_tensor_bound_is_refused_as_too_large() -> None:
    """8,192 tokens of 64 channels in 64 heads: few MACs, but 17 GB of attention scores."""
    layer = {
        "name": "a", "op": "attention", "inputs": ["input"], "in_channels": 64, "out_channels": 64,
        "in_hw": [1, 8192], "out_hw": [1, 8192], "kernel": [1, 8192], "groups": 64,
    }  # fmt: skip
    with pytest.raises(ArchitectureTooLarge, match="attention score tensor"):
        Network.from_dict({"input_shape": [1, 64, 1, 8192], "layers": [layer], "outputs": ["a"]})
    layer |= {"groups": 2}  # 0.5 GB of scores
    Network.from_dict({"input_shape": [1, 64, 1, 8192], "layers": [layer], "outputs": ["a"]})


def test_vit_and_maxvit_are_built_for_the_input_size_asked_or_refused_naming_it() -> None:
    # ViT's position embedding and MaxViT's partitions are sized for the input when it is built.
    small = network_from_torchvision("vit_b_16", (1, 3, 64, 64))
    embedding = next(layer for layer in small.layers if layer.op is Op.POSITION_EMBEDDING)
    assert embedding.in_hw == (1, 17)  # 4x4 patches of 16 px and the class token
    assert network_from_torchvision("maxvit_t", (1, 3, 448, 448)).input_shape == (1, 3, 448, 448)
    for name, hw, message in (
        ("vit_b_16", (64, 48), "square inputs only"),
        ("vit_b_16", (70, 70), "cannot be built for a 70x70 input"),
        ("maxvit_t", (64, 64), "not divisible by partition size"),
    ):
        with pytest.raises(InvalidArchitecture, match=message) as refused:
            network_from_torchvision(name, (1, 3, *hw))
        assert refused.value.details == {"model": name, "input_hw": list(hw)}
        assert LPNET_ERROR_STATUS[type(refused.value)] == 422
