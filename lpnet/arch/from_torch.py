"""Build the IR from PyTorch: any nn.Module by torch.fx tracing, or a torchvision model by name."""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from lpnet.arch.ir import ACTIVATIONS, NETWORK_INPUT, InputShape, Layer, Network, Op, architecture_error
from lpnet.errors import InvalidArchitecture, UnknownModel, UnsupportedOperator

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 224, 224)
# torch.fx patches nn.Module.__call__ and friends for the whole process while it traces: a second
# trace, or the shape propagation of one, running meanwhile sees the patches and fails. One trace
# (with its shape propagation) at a time per process.
_TRACE_LOCK = threading.Lock()


class _TraceInput(BaseModel):
    input_shape: InputShape


_ACTIVATION_MODULES: dict[type[nn.Module], Op] = {
    nn.ReLU: Op.RELU,
    nn.ReLU6: Op.RELU6,
    nn.SiLU: Op.SILU,
    nn.GELU: Op.GELU,
    nn.Sigmoid: Op.SIGMOID,
    nn.Tanh: Op.TANH,
    nn.Hardswish: Op.HARDSWISH,
    nn.Hardsigmoid: Op.HARDSIGMOID,
}
_ACTIVATION_FUNCTIONS: dict[Any, Op] = {
    F.relu: Op.RELU,
    torch.relu: Op.RELU,
    F.relu6: Op.RELU6,
    F.silu: Op.SILU,
    F.gelu: Op.GELU,
    torch.sigmoid: Op.SIGMOID,
    F.sigmoid: Op.SIGMOID,
    torch.tanh: Op.TANH,
    F.hardswish: Op.HARDSWISH,
    F.hardsigmoid: Op.HARDSIGMOID,
}
_ACTIVATION_METHODS: dict[str, Op] = {"relu": Op.RELU, "sigmoid": Op.SIGMOID, "tanh": Op.TANH}
# Modules and functions that are the identity at inference: their output aliases their input.
_INFERENCE_NOOP_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout2d, nn.Identity)
_INFERENCE_NOOP_METHODS = frozenset({"contiguous", "clone", "detach"})
# Layers that compute on a channels-last tensor as they would on its NCHW original (conv2d stands for
# a linear over the channels, batchnorm2d for a per-channel scale).
# Attention, position embeddings, class tokens and patch merging are defined on channels-last maps and
# token sequences, whose NCHW form the IR holds.
_CHANNELS_LAST_OPS = ACTIVATIONS | {
    Op.ADD,
    Op.MUL,
    Op.LAYERNORM,
    Op.CONV2D,
    Op.BATCHNORM2D,
    Op.CLASS_TOKEN,
    Op.POSITION_EMBEDDING,
    Op.ATTENTION,
    Op.SPACE_TO_DEPTH,
}
# Functions that re-view a tensor (or read a part of it), by the method name they equal.
_VIEW_FUNCTIONS: dict[Any, str] = {
    operator.getitem: "getitem",
    torch.chunk: "chunk",
    torch.split: "split",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.flatten: "flatten",
    torch.mean: "mean",
}
# Positional parameters of the functions and methods whose arguments the converter reads by name.
_FUNCTION_PARAMETERS: dict[Any, tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.softmax: ("input", "dim"),
    torch.softmax: ("input", "dim"),
    F.local_response_norm: ("input", "size", "alpha", "beta", "k"),
    F.pad: ("input", "pad", "mode", "value"),
    F.interpolate: ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"),
    torch.channel_shuffle: ("input", "groups"),
    torch.native_channel_shuffle: ("input", "groups"),
}
_METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {"softmax": ("self", "dim")}
# torchvision's Swin computes its windowed attention and its patch merging in functions that torch.fx
# keeps as single calls (torch.fx.wrap).
_SWIN_ATTENTION_PARAMETERS = (
    "input",
    "qkv_weight",
    "proj_weight",
    "relative_position_bias",
    "window_size",
    "num_heads",
    "shift_size",
    "attention_dropout",
    "dropout",
    "qkv_bias",
    "proj_bias",
    "logit_scale",
    "training",
)


def _swin_functions() -> tuple[Any, Any]:
    """torchvision's (shifted_window_attention, _patch_merging_pad), or Nones without torchvision."""
    try:
        from torchvision.models import swin_transformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None, None
    return swin_transformer.shifted_window_attention, swin_transformer._patch_merging_pad


def _inference_noop_functions() -> set[Any]:
    fns: set[Any] = {F.dropout, torch.dropout}
    try:  # torchvision's stochastic depth is the identity when not training
        from torchvision.ops import stochastic_depth

        fns.add(stochastic_depth)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return fns


def _maxvit_modules() -> tuple[type[nn.Module], ...]:
    """torchvision MaxViT's (WindowPartition, SwapAxes, WindowDepartition, its attention), or ()."""
    try:
        from torchvision.models import maxvit
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (
        maxvit.WindowPartition,
        maxvit.SwapAxes,
        maxvit.WindowDepartition,
        maxvit.RelativePositionalMultiHeadAttention,
    )


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every nn.LocalResponseNorm (subclasses too) and MaxViT's window
    partitions and attention as one module call each."""

    leaves: tuple[type[nn.Module], ...] = (nn.LocalResponseNorm, *_maxvit_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


class _MetaParameters(TorchFunctionMode):
    """Creates the tensors a module constructor allocates without naming a device on the meta device.

    Only the factories layers allocate parameters and buffers with are redirected: a constructor
    that computes its architecture with tensors (RegNet's block widths) still computes on the CPU,
    which `torch.device("meta")` would not allow.
    """

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full})

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def torchvision_model(
    name: str,
    num_classes: int = 1000,
    *,
    meta: bool = False,
    input_hw: tuple[int, int] | None = None,
) -> nn.Module:
    """Instantiate a torchvision classification model with random weights (nothing is downloaded).

    Args:
        name: a classification model of `torchvision.models`.
        num_classes: outputs of the classifier.
        meta: create parameters and buffers on the meta device: shapes only, nothing allocated or
            initialised, whatever the model's size.
        input_hw: the input's (H, W), for the models built for one input size (ViT's position
            embedding, MaxViT's partitions); others take any size and ignore it.

    Raises:
        UnknownModel: no such torchvision classification model.
        InvalidArchitecture: the model cannot be built for `input_hw` (ViT needs a square input
            divisible by its patch size, MaxViT one its partitions divide).
    """
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UnknownModel(
            f"unknown torchvision model {name!r}; classification models are: {', '.join(sorted(available))}",
            {"model": name},
        )
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name.startswith(("googlenet", "inception")):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    if input_hw is not None and name.startswith("vit_"):
        if input_hw[0] != input_hw[1]:
            raise InvalidArchitecture(
                f"{name} takes square inputs only, got {input_hw[0]}x{input_hw[1]}",
                {"model": name, "input_hw": list(input_hw)},
            )
        kwargs["image_size"] = input_hw[0]
    elif input_hw is not None and name.startswith("maxvit_"):
        kwargs["input_size"] = tuple(input_hw)
    try:
        if not meta:
            return torchvision.models.get_model(name, **kwargs).eval()
        with _MetaParameters():
            model = torchvision.models.get_model(name, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:
        if input_hw is None:
            raise
        raise InvalidArchitecture(
            f"{name} cannot be built for a {input_hw[0]}x{input_hw[1]} input: {exc}",
            {"model": name, "input_hw": list(input_hw)},
        ) from exc
    # Buffers a constructor computed on the CPU (Swin's position tables) join the parameters.
    return model.to("meta").eval()


def network_from_torchvision(name: str, input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE) -> Network:
    """Trace a torchvision model by name into the IR.

    The model is built and traced on the meta device, so nothing is allocated or computed at the
    model's or the input's size; the IR's bounds (`lpnet.arch.ir.MAX_PARAMS`, `MAX_MACS`, ...) are
    checked on the result.

    Raises:
        UnknownModel: no such torchvision classification model.
        UnsupportedOperator: the model uses an operator the IR cannot represent.
        InvalidArchitecture: the model cannot take this input (ArchitectureTooLarge when the traced
            network is beyond one of the IR's cost bounds).
    """
    shape = _input_shape(input_shape)
    module = torchvision_model(name, meta=True, input_hw=(shape[2], shape[3]))
    return network_from_module(module, input_shape, name=name, family=name)


def network_from_module(
    module: nn.Module,
    input_shape: Sequence[int],
    name: str | None = None,
    family: str | None = None,
) -> Network:
    """Trace any nn.Module with torch.fx and convert its graph to the IR.

    Shapes are propagated with zeros on the device of the module's parameters: a module on the meta
    device is traced without computing anything.

    Raises:
        UnsupportedOperator: naming the first operator the IR cannot represent and where it is.
        InvalidArchitecture: the traced graph is not a valid network (ArchitectureTooLarge when it is
            beyond one of the IR's cost bounds).
    """
    shape = _input_shape(input_shape)
    was_training = module.training
    module.eval()
    try:
        with _TRACE_LOCK, torch.no_grad():
            graph_module = fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
            ShapeProp(graph_module).propagate(torch.zeros(shape, device=_parameter_device(module)))
    except (UnsupportedOperator, InvalidArchitecture):
        raise
    except Exception as exc:  # tracing runs user code: report what failed, not a traceback
        raise UnsupportedOperator(
            type(exc).__name__, "(tracing)", f"torch.fx could not trace this module: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    converter = _FxConverter(graph_module)
    layers, outputs = converter.convert()
    try:
        return Network(name=name, family=family, input_shape=shape, layers=layers, outputs=outputs)
    except ValidationError as exc:
        raise architecture_error(exc) from exc


def _parameter_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _input_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The shape checked against the IR's bounds before any tensor of it is made."""
    try:
        return _TraceInput(input_shape=tuple(shape)).input_shape
    except ValidationError as exc:
        raise architecture_error(exc) from exc


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    items = tuple(int(v) for v in value)
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


@dataclass(frozen=True)
class _GroupedChannels:
    """A tensor viewed as (N, groups, C / groups, H, W), the first step of a channel shuffle.

    `transposed`: the two channel axes have been swapped; reshaped back to 4-D it is the shuffle.
    """

    source: str  # IR tensor it is a view of
    groups: int
    transposed: bool


@dataclass(frozen=True)
class _Partition:
    """An (N, C, H, W) map partitioned as MaxViT does, (N, groups, positions, C), channels-last.

    `size`: the partition's p (blocks of p x p positions). Attention runs over the positions axis:
    those of one block, or after a swap of the two middle axes (`swapped`), the positions at one
    offset in every block (MaxViT's grid attention, a window dilated by p).
    """

    shape: tuple[int, int, int, int]  # the map's (N, C, H, W)
    size: int
    swapped: bool


@dataclass(frozen=True)
class _Parts:
    """The parts of a chunk or split along channels: (offset, channels) of each, and the source tensor."""

    source: fx.Node
    spans: tuple[tuple[int, int], ...]


class _FxConverter:
    """Converts a shape-propagated fx graph into IR layers.

    Besides tensors in (N, C, H, W), it follows what a CNN computes between layers without being a
    layer: shapes read as numbers (`x.size()`, `x.shape`) and arithmetic on them, the 5-D view of a
    channel shuffle, the parts of a chunk along channels, and channels-last tensors (a permute to
    (N, H, W, C) followed by layer norms, linears over the channels and activations, and a permute
    back), which become NCHW layers: a channels-last layer norm is `layernorm`, a linear over the
    channels a 1x1 `conv2d`. Token sequences are channels-last too: (N, L, C) is the IR's
    (N, C, 1, L), and (N, C, L) (a map reshaped to its positions) the same map before its permute.
    Computations on parameters alone (a class token expanded to the batch, Swin's position bias
    tables) are weights, not layers: their results count as parameters of the layer reading them.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.alias: dict[str, str] = {}  # fx node name -> IR tensor name
        self.channels_last: set[str] = set()  # fx nodes holding their IR tensor permuted to NHWC
        self.grouped: dict[str, _GroupedChannels] = {}
        self.parts: dict[str, _Parts] = {}
        self.scalars: set[str] = set()  # fx nodes computing numbers (shapes), not tensors
        self.parameters: dict[str, tuple[int, ...]] = {}  # get_attr nodes: the shape of the tensor read
        self.layers: list[Layer] = []
        self.used_names: set[str] = set()
        self.noop_functions = _inference_noop_functions()
        self.attention_outputs: set[str] = set()  # nn.MultiheadAttention calls: (output, weights)
        self.partitions: dict[str, _Partition] = {}  # MaxViT's partitioned views of maps
        self.swin_attention, self.swin_patch_merging = _swin_functions()

    def convert(self) -> tuple[list[Layer], list[str]]:
        outputs: list[str] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.alias[node.name] = NETWORK_INPUT
            elif node.op == "output":
                outputs = [self._ref(arg) for arg in _flatten_args(node.args[0])]
            elif node.op == "get_attr":
                meta = node.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape"):
                    self.parameters[node.name] = tuple(int(d) for d in meta.shape)
                else:
                    self.scalars.add(node.name)
            else:
                self._convert_node(node)
        return self.layers, outputs

    def _ref(self, arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            raise UnsupportedOperator("constant", str(arg), "only tensors produced by layers can be inputs")
        if arg.name in self.alias and arg.name not in self.channels_last:
            return self.alias[arg.name]
        if arg.name in self.parameters:
            raise UnsupportedOperator(
                "get_attr", arg.name, f"the module reads tensor attribute {arg.target!r} in forward"
            )
        if arg.name in self.channels_last:
            raise UnsupportedOperator(
                "channels-last tensor",
                arg.name,
                "a tensor permuted to (N, H, W, C) is only supported through layer norms, linears, "
                "activations and adds until it is permuted back",
            )
        if arg.name in self.grouped:
            raise UnsupportedOperator(
                "grouped view", arg.name, "a 5-D view of the channels must be a channel shuffle"
            )
        raise UnsupportedOperator(
            "non-tensor value", arg.name, "only single (N, C, H, W) or (N, F) tensors can be layer inputs"
        )

    def _unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name = f"{base}:{k}"
            k += 1
        self.used_names.add(name)
        return name

    def _ir_shape(self, node: fx.Node) -> tuple[int, ...]:
        """The (N, C, H, W) or (N, F) shape of a tensor node in IR terms (channels-last permuted back)."""
        shape = _tensor_shape(node)
        if node.name in self.partitions:  # the map's shape, with the channels the node holds
            n, _, h, w = self.partitions[node.name].shape
            return n, shape[-1], h, w
        if len(shape) == 3:  # a token sequence: (N, L, C) channels-last, else (N, C, L)
            if node.name in self.channels_last:
                return shape[0], shape[2], 1, shape[1]
            return shape[0], shape[1], 1, shape[2]
        if node.name in self.channels_last:
            n, h, w, c = shape
            return n, c, h, w
        return shape

    def _add_layer(
        self,
        base: str,
        op: Op,
        inputs: list[str],
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        **attrs: Any,
    ) -> str:
        name = self._unique_name(base)
        in_channels = attrs.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=name,
                op=op,
                inputs=inputs,
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=_hw(in_shape),
                out_hw=_hw(out_shape),
                **attrs,
            )
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc
        self.layers.append(layer)
        return name

    def _alias(self, node: fx.Node, source: fx.Node) -> None:
        """`node` is the tensor `source` is (an identity at inference, or a view of the same values)."""
        if source.name in self.alias:
            self.alias[node.name] = self.alias[source.name]
        if source.name in self.grouped:
            self.grouped[node.name] = self.grouped[source.name]
        if source.name in self.parts:
            self.parts[node.name] = self.parts[source.name]
        if source.name in self.channels_last:
            self.channels_last.add(node.name)
        if source.name in self.partitions:
            self.partitions[node.name] = self.partitions[source.name]
        if source.name in self.scalars:
            self.scalars.add(node.name)

    def _convert_node(self, node: fx.Node) -> None:
        if node.meta.get("tensor_meta") is None:  # a number or a shape, not a tensor
            self.scalars.add(node.name)
            return
        if self._computes_on_parameters(node):
            meta = node.meta["tensor_meta"]
            self.parameters[node.name] = tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else ()
            return
        if self._convert_view(node):
            return
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, _INFERENCE_NOOP_MODULES):
                self._alias(node, node.args[0])  # type: ignore[arg-type]
                return
            if isinstance(module, nn.MultiheadAttention):
                self._multihead_attention(node, module)
                return
            if self._maxvit_partition(node, module):
                return
            op, attrs = self._module_op(node, module)
            base = str(node.target)
        elif node.op == "call_function":
            if node.target in self.noop_functions:
                self._alias(node, node.args[0])  # type: ignore[arg-type]
                return
            if node.target is torch.cat and len(node.args[0]) == 1:  # type: ignore[arg-type]
                self._alias(node, node.args[0][0])  # type: ignore[index, arg-type]
                return
            op, attrs = self._function_op(node)
            base = node.name
        elif node.op == "call_method":
            if node.target in _INFERENCE_NOOP_METHODS:
                self._alias(node, node.args[0])  # type: ignore[arg-type]
                return
            op, attrs = self._method_op(node)
            base = node.name
        else:  # pragma: no cover - fx has no other node kinds
            raise UnsupportedOperator(node.op, node.name)
        inputs: list[fx.Node] = attrs.pop("inputs")
        layouts = {arg.name in self.channels_last for arg in inputs}
        if True in layouts:
            if op not in _CHANNELS_LAST_OPS or len(layouts) > 1:
                self._ref(next(arg for arg in inputs if arg.name in self.channels_last))  # raises
            refs = [self.alias[arg.name] for arg in inputs]
            self.channels_last.add(node.name)
            partitions = {self.partitions[arg.name] for arg in inputs if arg.name in self.partitions}
            if partitions:
                if len(partitions) != 1 or any(arg.name not in self.partitions for arg in inputs):
                    raise UnsupportedOperator(
                        op.value, node.name, "its inputs must be the same MaxViT partition of one map"
                    )
                self.partitions[node.name] = next(iter(partitions))
        else:
            refs = [self._ref(arg) for arg in inputs]
        in_shape = self._ir_shape(inputs[0])
        out_shape = self._ir_shape(node)
        self.alias[node.name] = self._add_layer(base, op, refs, in_shape, out_shape, **attrs)

    def _computes_on_parameters(self, node: fx.Node) -> bool:
        """Whether every tensor `node` reads is a parameter or computed from parameters alone."""
        tensors = [
            arg
            for arg in _flatten_args([*node.args, *node.kwargs.values()])
            if isinstance(arg, fx.Node) and arg.name not in self.scalars
        ]
        return bool(tensors) and all(arg.name in self.parameters for arg in tensors)

    def _multihead_attention(self, node: fx.Node, module: nn.MultiheadAttention) -> None:
        """Self-attention of a batch-first token sequence: an `attention` layer over all its positions."""
        bound = _bind(node, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"))
        query = bound.get("query")
        refused = None
        if not module.batch_first:
            refused = "only batch_first=True is supported"
        elif bound.get("key") is not query or bound.get("value") is not query:
            refused = "only self-attention (query, key and value the same tensor) is supported"
        elif any(bound.get(m) is not None for m in ("key_padding_mask", "attn_mask")):
            refused = "attention masks are not supported"
        elif module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
            refused = (
                "only the standard projections (no add_bias_kv, add_zero_attn or kdim/vdim) are supported"
            )
        elif not isinstance(query, fx.Node) or query.name not in self.channels_last:
            refused = "only a (N, L, C) token sequence is supported as the input"
        if refused:
            raise UnsupportedOperator("MultiheadAttention", str(node.target), refused)
        assert isinstance(query, fx.Node)
        shape = self._ir_shape(query)
        self.alias[node.name] = self._add_layer(
            str(node.target),
            Op.ATTENTION,
            [self.alias[query.name]],
            shape,
            shape,
            groups=module.num_heads,
            kernel=_hw(shape),
            bias=module.in_proj_bias is not None,
        )
        self.attention_outputs.add(node.name)

    def _maxvit_partition(self, node: fx.Node, module: nn.Module) -> bool:
        """MaxViT's window partition, axis swap and departition: views of the map, not layers."""
        leaves = _maxvit_modules()
        if not leaves or not isinstance(module, leaves[:3]):
            return False
        partition_type, swap_type, departition_type = leaves[:3]
        source = node.args[0]
        assert isinstance(source, fx.Node)
        where = str(node.target)
        if isinstance(module, partition_type):
            shape = _tensor_shape(source)
            size = int(node.args[1])  # type: ignore[arg-type]
            if source.name in self.channels_last or len(shape) != 4 or shape[2] % size or shape[3] % size:
                raise UnsupportedOperator(
                    "WindowPartition", where, f"only (N, C, H, W) maps divisible by {size} are supported"
                )
            self.alias[node.name] = self._ref(source)
            self.partitions[node.name] = _Partition((shape[0], shape[1], shape[2], shape[3]), size, False)
            self.channels_last.add(node.name)
            return True
        partition = self.partitions.get(source.name)
        if partition is None:
            raise UnsupportedOperator(type(module).__name__, where, "only on a MaxViT window partition")
        if isinstance(module, swap_type):
            if sorted((int(module.a) % 4, int(module.b) % 4)) != [1, 2]:  # type: ignore[arg-type]
                raise UnsupportedOperator("SwapAxes", where, "only a swap of the groups and positions axes")
            self._alias(node, source)
            self.partitions[node.name] = _Partition(partition.shape, partition.size, not partition.swapped)
            return True
        if partition.swapped or int(node.args[1]) != partition.size:  # type: ignore[arg-type]
            raise UnsupportedOperator("WindowDepartition", where, "it must undo the partition it reads")
        self.alias[node.name] = self.alias[source.name]
        return True

    def _maxvit_attention(self, node: fx.Node, module: nn.Module) -> tuple[Op, dict[str, Any]]:
        """MaxViT's attention over a partition's positions: a windowed or dilated `attention` layer."""
        source = node.args[0]
        assert isinstance(source, fx.Node)
        partition = self.partitions.get(source.name)
        if partition is None:
            raise UnsupportedOperator(
                "RelativePositionalMultiHeadAttention", str(node.target), "only on a MaxViT window partition"
            )
        _, _, h, w = partition.shape
        p = partition.size
        window, dilation = ((h // p, w // p), (p, p)) if partition.swapped else ((p, p), (1, 1))
        return Op.ATTENTION, {
            "inputs": [source],
            "groups": int(module.n_heads),  # type: ignore[arg-type]
            "kernel": window,
            "dilation": dilation,
            "bias": module.to_qkv.bias is not None,  # type: ignore[union-attr]
            "position_bias": True,
        }

    def _swin_attention(self, node: fx.Node) -> tuple[Op, dict[str, Any]]:
        """torchvision's shifted_window_attention: an `attention` layer with a window and a shift."""
        bound = _bind(node, _SWIN_ATTENTION_PARAMETERS)
        source = bound["input"]
        if not isinstance(source, fx.Node) or source.name not in self.channels_last:
            raise UnsupportedOperator(
                "shifted_window_attention", node.name, "its input must be a channels-last (N, H, W, C) map"
            )
        _, h, w, _ = _tensor_shape(source)
        window = _pair(bound["window_size"])
        shift = list(_pair(bound.get("shift_size", 0)))
        # As torchvision does: no shift along a dimension that one window covers.
        for i, size in enumerate((h, w)):
            if window[i] >= -(-size // window[i]) * window[i]:
                shift[i] = 0
        return Op.ATTENTION, {
            "inputs": [source],
            "groups": int(bound["num_heads"]),
            "kernel": window,
            "shift": tuple(shift),
            "bias": bound.get("qkv_bias") is not None,
            "position_bias": bound.get("relative_position_bias") is not None,
        }

    # ---- views: numbers, permutes, reshapes, chunks and slices ------------------------------------

    def _convert_view(self, node: fx.Node) -> bool:
        """Handle a node that re-views a tensor rather than computing on it; False when it is not one."""
        target = node.target
        if node.op == "call_method":
            kind = str(target)
        elif node.op == "call_function" and target in _VIEW_FUNCTIONS:
            kind = _VIEW_FUNCTIONS[target]
        else:
            return False
        if kind == "getitem":
            return self._getitem(node)
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return False
        if kind in ("chunk", "split"):
            self._split(node, source)
            return True
        if kind == "mean":
            self._mean(node, source)
            return True
        if kind in ("view", "reshape") or (kind == "flatten" and source.name in self.grouped):
            return self._reshape(node, source)
        if kind in ("permute", "transpose"):
            self._permute(node, source)
            return True
        return False

    def _split(self, node: fx.Node, source: fx.Node) -> None:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        rank = len(_tensor_shape(source))
        if source.name in self.channels_last or dim not in (1, 1 - rank):
            raise UnsupportedOperator(
                str(getattr(node.target, "__name__", node.target)),
                node.name,
                f"only a split along channels (dim=1) of an (N, C, H, W) tensor is supported, got dim={dim}",
            )
        metas = node.meta.get("tensor_meta")
        spans, offset = [], 0
        for meta in metas:  # type: ignore[union-attr]
            channels = int(meta.shape[1])
            spans.append((offset, channels))
            offset += channels
        self.parts[node.name] = _Parts(source, tuple(spans))

    def _getitem(self, node: fx.Node) -> bool:
        container, index = node.args[0], node.args[1]
        if not isinstance(container, fx.Node):
            return False
        if container.name in self.parts:
            parts = self.parts[container.name]
            offset, channels = parts.spans[int(index)]  # type: ignore[arg-type]
            self._slice(node, parts.source, offset, channels)
            return True
        if container.name in self.scalars:
            self.scalars.add(node.name)
            return True
        if container.name in self.attention_outputs:
            if index != 0:
                raise UnsupportedOperator(
                    "MultiheadAttention", node.name, "attention weights are not supported"
                )
            self.alias[node.name] = self.alias[container.name]
            self.channels_last.add(node.name)
            return True
        if container.name in self.channels_last and len(_tensor_shape(container)) == 3:
            if index != (slice(None), 0):
                raise UnsupportedOperator(
                    "getitem",
                    node.name,
                    f"only the first token (x[:, 0]) of a token sequence can be read, got index {index!r}",
                )
            self.alias[node.name] = self._add_layer(
                node.name,
                Op.TOKEN_SELECT,
                [self.alias[container.name]],
                self._ir_shape(container),
                _tensor_shape(node),
            )
            return True
        span = _channel_slice(index, _tensor_shape(container))
        if span is None:
            raise UnsupportedOperator(
                "getitem",
                node.name,
                f"only a contiguous slice of the channels (x[:, a:b]) is supported, got index {index!r}",
            )
        self._slice(node, container, *span)
        return True

    def _slice(self, node: fx.Node, source: fx.Node, offset: int, channels: int) -> None:
        in_shape = self._ir_shape(source)
        if offset == 0 and channels == in_shape[1]:
            self._alias(node, source)
            return
        ref = self._ref(source)
        self.alias[node.name] = self._add_layer(
            node.name, Op.SLICE, [ref], in_shape, _tensor_shape(node), channel_offset=offset
        )

    def _reshape(self, node: fx.Node, source: fx.Node) -> bool:
        in_shape = _tensor_shape(source)
        out_shape = _tensor_shape(node)
        grouped = self.grouped.get(source.name)
        if grouped is not None:
            if len(out_shape) != 4:
                raise UnsupportedOperator(
                    str(node.target),
                    node.name,
                    "a 5-D view of the channels must be reshaped back to (N, C, H, W)",
                )
            if not grouped.transposed:  # viewed and viewed back: the same tensor
                self.alias[node.name] = grouped.source
                return True
            shape = (out_shape[0], out_shape[1], out_shape[2], out_shape[3])
            self.alias[node.name] = self._add_layer(
                node.name, Op.CHANNEL_SHUFFLE, [grouped.source], shape, shape, groups=grouped.groups
            )
            return True
        if source.name in self.channels_last or source.name not in self.alias:
            return False
        if out_shape == in_shape:
            self._alias(node, source)
            return True
        if len(in_shape) == 4 and len(out_shape) == 5:
            n, c, h, w = in_shape
            if out_shape[0] == n and out_shape[3:] == (h, w) and out_shape[1] * out_shape[2] == c:
                self.grouped[node.name] = _GroupedChannels(self._ref(source), out_shape[1], False)
                return True
        if len(in_shape) == 4 and out_shape == (in_shape[0], _numel(in_shape[1:])):
            self.alias[node.name] = self._add_layer(
                node.name, Op.FLATTEN, [self._ref(source)], in_shape, out_shape
            )
            return True
        if len(in_shape) == 4 and out_shape == (*in_shape[:2], in_shape[2] * in_shape[3]):
            self.alias[node.name] = self._add_layer(
                node.name, Op.TOKENS, [self._ref(source)], in_shape, self._ir_shape(node)
            )
            return True
        raise UnsupportedOperator(
            f"Tensor.{node.target}" if node.op == "call_method" else str(node.target),
            node.name,
            f"only a flatten or the views of a channel shuffle are supported, got {in_shape} -> {out_shape}",
        )

    def _permute(self, node: fx.Node, source: fx.Node) -> None:
        args: list[Any] = list(node.args[1:])
        dims: tuple[Any, ...] = (
            tuple(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else tuple(args)
        )
        if not dims:
            kwargs: dict[str, Any] = dict(node.kwargs)
            dims = tuple(kwargs.get("dims", ())) or (kwargs.get("dim0"), kwargs.get("dim1"))
        rank = len(_tensor_shape(source))
        if node.target in ("transpose",) or node.target is torch.transpose:
            a, b = (int(d) % rank for d in dims)
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
            dims = tuple(order)
        perm = tuple(int(d) % rank for d in dims)
        if source.name in self.partitions:
            raise UnsupportedOperator(
                "permute", node.name, "a MaxViT partition is only undone by its WindowDepartition"
            )
        grouped = self.grouped.get(source.name)
        if grouped is not None and perm == (0, 2, 1, 3, 4):
            self.grouped[node.name] = _GroupedChannels(grouped.source, grouped.groups, not grouped.transposed)
            return
        if source.name in self.alias and rank == 4:
            if source.name not in self.channels_last and perm == (0, 2, 3, 1):
                self.alias[node.name] = self.alias[source.name]
                self.channels_last.add(node.name)
                return
            if source.name in self.channels_last and perm == (0, 3, 1, 2):
                self.alias[node.name] = self.alias[source.name]
                return
            if perm == (0, 1, 2, 3):
                self._alias(node, source)
                return
        if source.name in self.alias and rank == 3 and perm == (0, 2, 1):  # (N, C, L) <-> (N, L, C)
            self.alias[node.name] = self.alias[source.name]
            if source.name not in self.channels_last:
                self.channels_last.add(node.name)
            return
        raise UnsupportedOperator(
            "permute",
            node.name,
            f"only (N, C, H, W) <-> (N, H, W, C) permutes and channel shuffles are supported, got {perm}",
        )

    # ---- layers -----------------------------------------------------------------------------------

    def _module_op(self, node: fx.Node, module: nn.Module) -> tuple[Op, dict[str, Any]]:
        where = str(node.target)
        inputs = [node.args[0]]
        source = node.args[0]
        if (
            isinstance(module, nn.Conv2d | nn.BatchNorm2d)
            and isinstance(source, fx.Node)
            and source.name in self.channels_last
        ):
            self._ref(source)  # raises: a 2-D convolution or batch norm of a channels-last tensor
        leaves = _maxvit_modules()
        if leaves and isinstance(module, leaves[3]):
            return self._maxvit_attention(node, module)
        if isinstance(module, nn.Conv2d):
            if not isinstance(module.padding, tuple):
                raise UnsupportedOperator(
                    "conv2d", where, f"padding mode {module.padding!r} is not supported"
                )
            if module.padding_mode != "zeros":
                raise UnsupportedOperator(
                    "conv2d", where, f"padding_mode={module.padding_mode!r} is not supported"
                )
            return Op.CONV2D, {
                "inputs": inputs,
                "kernel": _pair(module.kernel_size),
                "stride": _pair(module.stride),
                "padding": _pair(module.padding),
                "dilation": _pair(module.dilation),
                "groups": module.groups,
                "bias": module.bias is not None,
            }
        if isinstance(module, nn.Linear):
            return self._linear(node, module.bias is not None)
        if isinstance(module, nn.BatchNorm2d):
            return Op.BATCHNORM2D, {"inputs": inputs}
        if type(module) in _ACTIVATION_MODULES:
            return _ACTIVATION_MODULES[type(module)], {"inputs": inputs}
        if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
            return Op.RELU6, {"inputs": inputs}
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise UnsupportedOperator("maxpool2d", where, "return_indices=True is not supported")
            return Op.MAXPOOL2D, {
                "inputs": inputs,
                "kernel": _pair(module.kernel_size),
                "stride": _pair(module.stride if module.stride is not None else module.kernel_size),
                "padding": _pair(module.padding),
                "dilation": _pair(module.dilation),
                "ceil_mode": bool(module.ceil_mode),
            }
        if isinstance(module, nn.AvgPool2d):
            return Op.AVGPOOL2D, {
                "inputs": inputs,
                "kernel": _pair(module.kernel_size),
                "stride": _pair(module.stride if module.stride is not None else module.kernel_size),
                "padding": _pair(module.padding),
                "ceil_mode": bool(module.ceil_mode),
            }
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return Op.ADAPTIVE_AVGPOOL2D, {"inputs": inputs}
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise UnsupportedOperator("flatten", where, "only flatten(start_dim=1) is supported")
            return Op.FLATTEN, {"inputs": inputs}
        if isinstance(module, nn.LocalResponseNorm):
            return Op.LRN, {"inputs": inputs, "kernel": (int(module.size), 1)}
        if isinstance(module, nn.ZeroPad2d | nn.ConstantPad2d):
            return self._pad(node, module.padding, float(module.value), "constant")
        if isinstance(module, nn.Softmax):
            return self._softmax(node, module.dim)
        if isinstance(module, nn.ChannelShuffle):
            return Op.CHANNEL_SHUFFLE, {"inputs": inputs, "groups": int(module.groups)}
        if isinstance(module, nn.Upsample):  # UpsamplingNearest2d and UpsamplingBilinear2d too
            return self._upsample(node, module.mode)
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, module.normalized_shape)
        raise UnsupportedOperator(type(module).__name__, where)

    def _function_op(self, node: fx.Node) -> tuple[Op, dict[str, Any]]:
        target = node.target
        if target in (operator.add, torch.add, operator.iadd):
            return self._binary(node, Op.ADD, "add")
        if target in (operator.mul, torch.mul, operator.imul):
            return self._binary(node, Op.MUL, "mul")
        if target in _ACTIVATION_FUNCTIONS:
            return _ACTIVATION_FUNCTIONS[target], {"inputs": [node.args[0]]}
        if target is torch.cat:
            return self._concat(node)
        if target is not None and target is self.swin_attention:
            return self._swin_attention(node)
        if target is not None and target is self.swin_patch_merging:
            return Op.SPACE_TO_DEPTH, {"inputs": [node.args[0]]}
        if target is torch.flatten:
            return self._flatten(node, node.args[1:], node.kwargs)
        if target is F.adaptive_avg_pool2d:
            return Op.ADAPTIVE_AVGPOOL2D, {"inputs": [node.args[0]]}
        if target in (F.avg_pool2d, F.max_pool2d):
            return self._functional_pool(node, Op.AVGPOOL2D if target is F.avg_pool2d else Op.MAXPOOL2D)
        bound = _bind(node, _FUNCTION_PARAMETERS.get(target, ()))
        if target is F.linear:
            return self._linear(node, bound.get("bias") is not None)
        if target is F.layer_norm:
            return self._layer_norm(node, bound["normalized_shape"])
        if target in (F.softmax, torch.softmax):
            return self._softmax(node, bound.get("dim"))
        if target is F.local_response_norm:
            return Op.LRN, {"inputs": [node.args[0]], "kernel": (int(bound["size"]), 1)}
        if target is F.pad:
            return self._pad(node, bound["pad"], bound.get("value"), bound.get("mode", "constant"))
        if target is F.interpolate:
            return self._interpolate(node, bound)
        if target in (torch.channel_shuffle, torch.native_channel_shuffle):
            return Op.CHANNEL_SHUFFLE, {"inputs": [node.args[0]], "groups": int(bound["groups"])}
        name = getattr(target, "__name__", str(target))
        raise UnsupportedOperator(name, node.name)

    def _method_op(self, node: fx.Node) -> tuple[Op, dict[str, Any]]:
        method = str(node.target)
        if method in _ACTIVATION_METHODS:
            return _ACTIVATION_METHODS[method], {"inputs": [node.args[0]]}
        if method == "flatten":
            return self._flatten(node, node.args[1:], node.kwargs)
        if method in ("add", "mul"):
            op = Op.ADD if method == "add" else Op.MUL
            return self._binary(node, op, method)
        bound = _bind(node, _METHOD_PARAMETERS.get(method, ()))
        if method == "softmax":
            return self._softmax(node, bound.get("dim"))
        raise UnsupportedOperator(f"Tensor.{method}", node.name)

    def _binary(self, node: fx.Node, op: Op, what: str) -> tuple[Op, dict[str, Any]]:
        """add or mul of two tensors; with a per-channel parameter (a layer scale), a batchnorm2d."""
        args = list(node.args)
        params = [a for a in args if isinstance(a, fx.Node) and a.name in self.parameters]
        if len(args) == 2 and len(params) == 1:
            (param,) = params
            (tensor,) = [a for a in args if a is not param]
            if isinstance(tensor, fx.Node) and self._per_channel(tensor, self.parameters[param.name]):
                return Op.BATCHNORM2D, {"inputs": [tensor]}
            if (
                op is Op.ADD
                and isinstance(tensor, fx.Node)
                and self.parameters[param.name] == (1, *_tensor_shape(tensor)[1:])
            ):
                return Op.POSITION_EMBEDDING, {"inputs": [tensor]}
            raise UnsupportedOperator(
                what,
                node.name,
                f"only a per-channel parameter can be a {what} operand, got one of shape "
                f"{self.parameters[param.name]}",
            )
        return op, {"inputs": self._tensor_args(node, what)}

    def _per_channel(self, tensor: fx.Node, shape: tuple[int, ...]) -> bool:
        """A parameter of `shape` broadcasts one value per channel over `tensor`."""
        channels = self._ir_shape(tensor)[1]
        if tensor.name in self.channels_last:
            return shape in ((channels,), (1, 1, channels), (1, 1, 1, channels))
        return shape in ((channels, 1, 1), (1, channels, 1, 1))

    def _mean(self, node: fx.Node, source: fx.Node) -> None:
        """A mean over H and W: adaptive average pooling, then a flatten unless the dims are kept."""
        params = ("input", "dim", "keepdim") if node.op == "call_function" else ("self", "dim", "keepdim")
        bound = _bind(node, params)
        dim = bound.get("dim")
        shape = _tensor_shape(source)
        dims = (dim,) if isinstance(dim, int) else tuple(dim or ())
        if len(shape) != 4 or source.name in self.channels_last or sorted(int(d) % 4 for d in dims) != [2, 3]:
            raise UnsupportedOperator(
                "mean",
                node.name,
                f"only a mean over H and W (dims 2, 3) is supported, got dim={dim} of {shape}",
            )
        pooled_shape = (shape[0], shape[1], 1, 1)
        pooled = self._add_layer(node.name, Op.ADAPTIVE_AVGPOOL2D, [self._ref(source)], shape, pooled_shape)
        if bound.get("keepdim", False):
            self.alias[node.name] = pooled
            return
        flat_shape = (shape[0], shape[1])
        self.alias[node.name] = self._add_layer(
            f"{node.name}:flatten", Op.FLATTEN, [pooled], pooled_shape, flat_shape
        )

    def _linear(self, node: fx.Node, bias: bool) -> tuple[Op, dict[str, Any]]:
        """A linear layer; over the channels of a channels-last map, the 1x1 convolution it equals."""
        source = node.args[0]
        assert isinstance(source, fx.Node)
        if source.name in self.channels_last:
            return Op.CONV2D, {"inputs": [source], "bias": bias}
        if len(_tensor_shape(source)) != 2:
            raise UnsupportedOperator(
                "linear",
                node.name,
                f"only a linear layer on (N, F) features or on channels-last maps, got {_tensor_shape(source)}",
            )
        return Op.LINEAR, {"inputs": [source], "bias": bias}

    def _layer_norm(self, node: fx.Node, normalized_shape: Any) -> tuple[Op, dict[str, Any]]:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        shape = (
            tuple(int(d) for d in normalized_shape)
            if not isinstance(normalized_shape, int)
            else (normalized_shape,)
        )
        if source.name not in self.channels_last and len(_tensor_shape(source)) == 2:
            if shape == _tensor_shape(source)[1:]:
                return Op.LAYERNORM, {"inputs": [source]}
        if source.name in self.channels_last and shape == (self._ir_shape(source)[1],):
            return Op.LAYERNORM, {"inputs": [source]}
        raise UnsupportedOperator(
            "layer_norm",
            node.name,
            f"only a layer norm over the channels (of a channels-last map or of (N, F) features) is "
            f"supported, got normalized_shape={shape} on {_tensor_shape(source)}",
        )

    def _softmax(self, node: fx.Node, dim: Any) -> tuple[Op, dict[str, Any]]:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        rank = len(_tensor_shape(source))
        if dim is None or source.name in self.channels_last or int(dim) % rank != 1:
            raise UnsupportedOperator(
                "softmax", node.name, f"only a softmax over channels (dim=1) is supported, got dim={dim}"
            )
        return Op.SOFTMAX, {"inputs": [source]}

    def _pad(self, node: fx.Node, pad: Any, value: Any, mode: str) -> tuple[Op, dict[str, Any]]:
        """Zero padding of H and W, the same on both sides of each."""
        amounts = (pad,) * 4 if isinstance(pad, int) else tuple(pad)
        if len(amounts) == 2:
            amounts = (*amounts, 0, 0)
        if mode != "constant" or value not in (None, 0, 0.0) or len(amounts) != 4:
            raise UnsupportedOperator(
                "pad",
                node.name,
                f"only zero padding of H and W is supported, got mode={mode!r} value={value}",
            )
        left, right, top, bottom = (int(a) for a in amounts)
        if left != right or top != bottom or min(amounts) < 0:
            raise UnsupportedOperator(
                "pad",
                node.name,
                f"only the same non-negative padding on both sides is supported, got {amounts}",
            )
        return Op.PAD, {"inputs": [node.args[0]], "padding": (top, left)}

    def _upsample(self, node: fx.Node, mode: str) -> tuple[Op, dict[str, Any]]:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        ops = {"nearest": Op.UPSAMPLE_NEAREST, "bilinear": Op.UPSAMPLE_BILINEAR}
        if mode not in ops:
            raise UnsupportedOperator(
                "upsample", node.name, f"only nearest and bilinear modes are supported, got {mode!r}"
            )
        in_hw, out_hw = _hw(_tensor_shape(source)), _hw(_tensor_shape(node))
        if any(o % i for o, i in zip(out_hw, in_hw, strict=True)) or len(_tensor_shape(source)) != 4:
            raise UnsupportedOperator(
                "upsample", node.name, f"only integer scale factors are supported, got {in_hw} -> {out_hw}"
            )
        return ops[mode], {"inputs": [source]}

    def _interpolate(self, node: fx.Node, bound: dict[str, Any]) -> tuple[Op, dict[str, Any]]:
        if bound.get("antialias"):
            raise UnsupportedOperator("interpolate", node.name, "antialias=True is not supported")
        return self._upsample(node, str(bound.get("mode", "nearest")))

    def _tensor_args(self, node: fx.Node, what: str) -> list[fx.Node]:
        args = list(node.args)
        if not all(isinstance(a, fx.Node) for a in args) or len(args) != 2:
            raise UnsupportedOperator(
                what, node.name, "only tensor-tensor operations are supported, not scalars"
            )
        shapes = [_tensor_shape(a) for a in args]
        if what == "add" and shapes[0] != shapes[1]:
            raise UnsupportedOperator(
                what, node.name, f"broadcasting add of shapes {shapes} is not supported"
            )
        # Put the full-size tensor first so in_hw describes the larger operand (x * scale).
        args.sort(key=lambda a: -_numel(_tensor_shape(a)))
        return args  # type: ignore[return-value]

    def _functional_pool(self, node: fx.Node, op: Op) -> tuple[Op, dict[str, Any]]:
        names = ["input", "kernel_size", "stride", "padding"]
        if op is Op.MAXPOOL2D:
            names += ["dilation", "ceil_mode", "return_indices"]
        else:
            names += ["ceil_mode", "count_include_pad", "divisor_override"]
        bound: dict[str, Any] = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        kernel = _pair(bound["kernel_size"])
        stride = bound.get("stride") or kernel
        attrs: dict[str, Any] = {
            "inputs": [bound["input"]],
            "kernel": kernel,
            "stride": _pair(stride),
            "padding": _pair(bound.get("padding", 0)),
            "ceil_mode": bool(bound.get("ceil_mode", False)),
        }
        if op is Op.MAXPOOL2D:
            if bound.get("return_indices"):
                raise UnsupportedOperator("max_pool2d", node.name, "return_indices=True is not supported")
            attrs["dilation"] = _pair(bound.get("dilation", 1))
        elif bound.get("divisor_override"):
            raise UnsupportedOperator("avg_pool2d", node.name, "divisor_override is not supported")
        return op, attrs

    def _concat(self, node: fx.Node) -> tuple[Op, dict[str, Any]]:
        tensors = list(node.args[0])  # type: ignore[arg-type]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(tensors) == 2 and tensors[0].name in self.parameters and tensors[1].name in self.channels_last:
            token, sequence = _tensor_shape(tensors[0]), _tensor_shape(tensors[1])
            if len(sequence) == 3 and dim in (1, -2) and token[1:] == (1, sequence[2]):
                return Op.CLASS_TOKEN, {"inputs": [tensors[1]]}
        if dim != 1:
            raise UnsupportedOperator(
                "cat", node.name, f"only concatenation along channels (dim=1), got dim={dim}"
            )
        total = sum(_tensor_shape(t)[1] for t in tensors)
        return Op.CONCAT, {"inputs": tensors, "in_channels": total}

    def _flatten(
        self, node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[Op, dict[str, Any]]:
        start = args[0] if args else kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
        if start != 1 or end != -1:
            raise UnsupportedOperator(
                "flatten", node.name, f"only flatten(x, 1) is supported, got ({start}, {end})"
            )
        return Op.FLATTEN, {"inputs": [node.args[0]]}


def _bind(node: fx.Node, parameters: Sequence[str]) -> dict[str, Any]:
    """A call's arguments by parameter name: positional ones named by `parameters`, then keywords."""
    return dict(zip(parameters, node.args, strict=False)) | dict(node.kwargs)


def _channel_slice(index: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(offset, channels) when `index` reads a contiguous range of the channels of a tensor of `shape`."""
    items = index if isinstance(index, tuple) else (index,)
    if len(shape) < 2 or len(items) < 2 or items[0] != slice(None):
        return None
    channels = items[1]
    full = slice(None)
    if not isinstance(channels, slice) or any(item not in (full, Ellipsis) for item in items[2:]):
        return None
    if not all(
        bound is None or isinstance(bound, int) for bound in (channels.start, channels.stop, channels.step)
    ):
        return None
    start, stop, step = channels.indices(shape[1])
    if step != 1 or stop <= start:
        return None
    return start, stop - start


def _flatten_args(value: Any) -> list[Any]:
    if isinstance(value, tuple | list):
        items: list[Any] = []
        for v in value:
            items.extend(_flatten_args(v))
        return items
    return [value]


def _tensor_shape(node: Any) -> tuple[int, ...]:
    meta: Callable[..., Any] | Any = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise UnsupportedOperator(
            "non-tensor value",
            getattr(node, "name", str(node)),
            "only single tensors can flow between layers",
        )
    return tuple(int(d) for d in meta.shape)


def _hw(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 4:
        return shape[2], shape[3]
    if len(shape) == 2:
        return 1, 1
    raise UnsupportedOperator("tensor rank", str(shape), "only (N, C, H, W) and (N, F) tensors are supported")


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total
