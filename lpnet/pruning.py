"""Physical pruning through torch-pruning, and the IR-keyed weight format a pruned model is saved in.

A plan names, per channel group, how many channels stay (a width vector) and optionally which ones.
`prune_module` removes the others from a real nn.Module (a torchvision model, any traced module, or
one built from the IR) with torch-pruning's dependency graph, so coupled layers (residual adds,
depthwise convolutions, BatchNorm, the classifier's inputs) shrink together. The result is checked
layer by layer against `apply_width_vector`: a pruned module never silently differs from its plan.

Weights travel keyed by IR layer name (`"<layer>.<tensor>"`, e.g. `layer1.0.conv1.weight`). For a
torchvision model these are exactly its state-dict keys; modules built by `build_module` store the
same tensors under sanitised attribute names, and `layer_modules` bridges the two.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch_pruning as tp
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lpnet.arch.build import IR_LAYER_META, build_module
from lpnet.arch.groups import ChannelLayout, apply_width_vector, channel_layout
from lpnet.arch.ir import Network, Op
from lpnet.arch.onnx_io import export_onnx
from lpnet.errors import PruningFailed, WeightsMismatch

PRUNED_FORMAT = "lpnet-pruned-model"
PRUNED_FORMAT_VERSION = 1

# IR ops that own an nn.Module with tensors (parameters or buffers).
_MODULE_OPS = {Op.CONV2D: nn.Conv2d, Op.LINEAR: nn.Linear, Op.BATCHNORM2D: nn.BatchNorm2d}


@dataclass
class PrunedModel:
    """A physically pruned module with the IR of its new shapes.

    Attributes:
        module: the smaller module (eval mode).
        network: the pruned architecture (`apply_width_vector` of the original).
        widths: kept channels per group.
        kept_indices: per group, the original channel indices that stay (sorted).
    """

    module: nn.Module
    network: Network
    widths: list[int]
    kept_indices: list[list[int]]


# ---- layers <-> modules ---------------------------------------------------------------------------


def layer_modules(module: nn.Module, network: Network) -> dict[str, nn.Module]:
    """Map IR layer names to the submodules computing them (conv, linear and batch-norm layers).

    Works for modules built by `build_module` (through their fx metadata), for the torchvision model or
    traced module the IR came from (IR names are qualified module names), and for modules whose
    attributes follow `build_module`'s sanitised names.

    Raises:
        WeightsMismatch: a conv/linear/batch-norm layer of the IR has no matching submodule.
    """
    found: dict[str, nn.Module] = {}
    meta = module.meta.get(IR_LAYER_META) if isinstance(module, fx.GraphModule) else None
    if meta:
        for node in module.graph.nodes:  # type: ignore[union-attr]
            if node.op == "call_module" and node.name in meta:
                found[meta[node.name]] = module.get_submodule(str(node.target))
    submodules = dict(module.named_modules())
    result: dict[str, nn.Module] = {}
    for layer in network.layers:
        expected = _MODULE_OPS.get(layer.op)
        if expected is None:
            continue
        candidate: nn.Module | None = found.get(layer.name)
        if candidate is None:
            candidate = submodules.get(layer.name) or submodules.get(re.sub(r"\W", "_", layer.name))
        if candidate is None or not isinstance(candidate, expected):
            raise WeightsMismatch(
                f"the module has no {expected.__name__} for IR layer {layer.name!r}; pass the module the "
                "architecture was traced from, or one built from it with build_module",
                layer.name,
            )
        result[layer.name] = candidate
    return result


# ---- IR-keyed state dicts -------------------------------------------------------------------------


def ir_state_dict(module: nn.Module, network: Network) -> dict[str, torch.Tensor]:
    """The module's tensors keyed `"<IR layer>.<tensor>"` (parameters and batch-norm buffers)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, sub in layer_modules(module, network).items():
        for key, value in sub.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().clone().contiguous()
    return tensors


def load_ir_state_dict(module: nn.Module, network: Network, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy IR-keyed weights into a module (in place), checking every name and shape first.

    `num_batches_tracked` may be absent (it does not change inference).

    Raises:
        WeightsMismatch: naming the first tensor that is missing, unexpected or of the wrong shape.
    """
    # state_dict() tensors share storage with the module, so copying into them loads the weights.
    expected: dict[str, torch.Tensor] = {}
    for name, sub in layer_modules(module, network).items():
        for key, value in sub.state_dict().items():
            expected[f"{name}.{key}"] = value
    for key in weights:
        if key not in expected:
            raise WeightsMismatch(
                f"weight tensor {key!r} does not belong to this architecture (no such layer tensor); "
                "weights must be keyed '<layer name>.<tensor>' as in the model's state_dict",
                key,
            )
    for key, value in expected.items():
        if key not in weights:
            if key.endswith("num_batches_tracked"):
                continue
            raise WeightsMismatch(f"weight tensor {key!r} is missing", key)
        given = weights[key]
        if tuple(given.shape) != tuple(value.shape):
            raise WeightsMismatch(
                f"weight tensor {key!r} has shape {list(given.shape)} but the architecture needs "
                f"{list(value.shape)}",
                key,
                {"shape": list(given.shape), "expected_shape": list(value.shape)},
            )
    with torch.no_grad():
        for key, value in expected.items():
            if key in weights:
                value.copy_(weights[key].to(value.dtype))


def module_with_weights(network: Network, weights: Mapping[str, torch.Tensor] | None) -> fx.GraphModule:
    """Build the network as a module (eval mode) and load IR-keyed weights into it when given."""
    module = build_module(network)
    if weights is not None:
        load_ir_state_dict(module, network, weights)
    return module


# ---- choosing and removing channels ---------------------------------------------------------------


def group_l1_scores(module: nn.Module, network: Network) -> list[torch.Tensor]:
    """Per group, the L1 norm of each output filter summed over the group's coupled layers: (C_g,)."""
    layout = channel_layout(network)
    modules = layer_modules(module, network)
    scores = []
    for group in layout.groups:
        total = torch.zeros(group.channels)
        for name in group.out_layers:
            weight = modules[name].get_parameter("weight").detach()  # (C, ...)
            total += weight.abs().flatten(1).sum(1).float()
        scores.append(total)
    return scores


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` largest scores, sorted ascending (ties broken by lower index)."""
    order = sorted(range(int(scores.numel())), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def kept_indices_for(
    module: nn.Module, network: Network, widths: Sequence[int], method: str = "l1"
) -> list[list[int]]:
    """Which channels stay for a width vector: the top-L1 filters (`"l1"`) or the first k (`"first"`)."""
    values = channel_layout(network).validate(widths)
    if method == "first":
        return [list(range(k)) for k in values]
    if method != "l1":
        raise ValueError(f"unknown channel selection {method!r}; use 'l1' or 'first'")
    return [top_k_indices(s, k) for s, k in zip(group_l1_scores(module, network), values, strict=True)]


def prune_module(
    module: nn.Module,
    network: Network,
    widths: Sequence[int],
    kept_indices: Sequence[Sequence[int]] | None = None,
    selection: str = "l1",
) -> PrunedModel:
    """Physically prune a copy of `module` to `widths` (the original is left untouched).

    Args:
        module: a module computing `network` (torchvision, traced, or built from the IR).
        network: its IR; channel groups come from `channel_layout(network)`.
        widths: kept channels per group.
        kept_indices: which channels stay per group; chosen by `selection` when omitted.
        selection: `"l1"` (largest filters) or `"first"` when `kept_indices` is omitted.

    Raises:
        InvalidWidthVector: widths that do not fit the groups.
        PruningFailed: kept indices that do not match the widths, or a pruned module whose channel
            counts differ from `apply_width_vector(network, widths)`.
    """
    layout = channel_layout(network)
    values = layout.validate(widths)
    pruned = copy.deepcopy(module).eval()
    if kept_indices is None:
        kept = kept_indices_for(pruned, network, values, selection)
    else:
        kept = _check_kept(layout, values, kept_indices)
    modules = layer_modules(pruned, network)
    graph = tp.DependencyGraph().build_dependency(
        pruned, example_inputs=torch.zeros(network.input_shape), verbose=False
    )
    for group, keep in zip(layout.groups, kept, strict=True):
        remove = sorted(set(range(group.channels)) - set(keep))
        if not remove:
            continue
        root = modules[group.out_layers[0]]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(root, fn, idxs=remove).prune()
    pruned_network = apply_width_vector(network, values)
    check_channels(pruned, pruned_network)
    return PrunedModel(module=pruned.eval(), network=pruned_network, widths=values, kept_indices=kept)


def _check_kept(
    layout: ChannelLayout, widths: list[int], kept_indices: Sequence[Sequence[int]]
) -> list[list[int]]:
    if len(kept_indices) != len(layout.groups):
        raise PruningFailed(
            f"kept_indices has {len(kept_indices)} entries but the network has {len(layout.groups)} groups"
        )
    result = []
    for group, width, keep in zip(layout.groups, widths, kept_indices, strict=True):
        unique = sorted({int(i) for i in keep})
        if len(unique) != width or (unique and not 0 <= unique[0] <= unique[-1] < group.channels):
            raise PruningFailed(
                f"group {group.index} keeps {width} channels but its kept indices are {len(unique)} distinct "
                f"values in [0, {group.channels}) (got {len(keep)} entries)",
                {"group": group.index},
            )
        result.append(unique)
    return result


def check_channels(module: nn.Module, network: Network) -> None:
    """Check every conv, linear and batch-norm of `module` against the channel counts of `network`.

    Raises:
        PruningFailed: naming the first layer whose shape differs.
    """
    for name, sub in layer_modules(module, network).items():
        layer = network.by_name[name]
        got: tuple[int, ...]
        want: tuple[int, ...]
        if isinstance(sub, nn.Conv2d):
            got = (sub.in_channels, sub.out_channels, sub.groups)
            want = (layer.in_channels, layer.out_channels, layer.groups)
        elif isinstance(sub, nn.Linear):
            got, want = (sub.in_features, sub.out_features), (layer.in_channels, layer.out_channels)
        else:
            got, want = (sub.get_buffer("running_mean").numel(),), (layer.out_channels,)
        if got != want:
            raise PruningFailed(
                f"pruned layer {name!r} has (in, out[, groups]) = {got} but the plan says {want}",
                {"layer": name, "got": list(got), "expected": list(want)},
            )


# ---- saving, loading, exporting -------------------------------------------------------------------


def dump_pruned(pruned: PrunedModel) -> bytes:
    """Serialise a pruned model: IR-keyed tensors in safetensors, the pruned IR JSON in its header."""
    metadata = {
        "format": PRUNED_FORMAT,
        "format_version": str(PRUNED_FORMAT_VERSION),
        "network": pruned.network.to_json(),
        "widths": json.dumps(pruned.widths),
        "kept_indices": json.dumps(pruned.kept_indices),
    }
    return save_safetensors(ir_state_dict(pruned.module, pruned.network), metadata=metadata)


def load_pruned(data: bytes) -> PrunedModel:
    """Rebuild a pruned model saved by `dump_pruned`: `build_module` of its IR, then its weights.

    Raises:
        PruningFailed: the bytes are not a pruned-model file of a version this lpnet reads.
        WeightsMismatch: its tensors do not fit its own architecture.
    """
    metadata = _safetensors_metadata(data)
    if metadata.get("format") != PRUNED_FORMAT:
        raise PruningFailed(f"not an lpnet pruned-model file (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(PRUNED_FORMAT_VERSION):
        raise PruningFailed(
            f"pruned-model format version {metadata.get('format_version')} is not readable; this lpnet "
            f"reads version {PRUNED_FORMAT_VERSION}"
        )
    network = Network.from_json(metadata["network"])
    module = module_with_weights(network, load_safetensors(data))
    return PrunedModel(
        module=module,
        network=network,
        widths=[int(v) for v in json.loads(metadata["widths"])],
        kept_indices=[[int(i) for i in keep] for keep in json.loads(metadata["kept_indices"])],
    )


def export_pruned_onnx(pruned: PrunedModel) -> bytes:
    """ONNX bytes of the pruned module at its network's input shape."""
    return export_onnx(pruned.module, pruned.network.input_shape)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise PruningFailed("pruned-model file is truncated (no safetensors header)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise PruningFailed("pruned-model file is truncated (header longer than the file)")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise PruningFailed(f"pruned-model header is not JSON: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}
