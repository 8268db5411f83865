"""Build the IR from PyTorch: any nn.Module by torch.fx tracing, or a torchvision model by name."""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from lpnet.arch.ir import NETWORK_INPUT, InputShape, Layer, Network, Op, architecture_error
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


def _inference_noop_functions() -> set[Any]:
    fns: set[Any] = {F.dropout, torch.dropout}
    try:  # torchvision's stochastic depth is the identity when not training
        from torchvision.ops import stochastic_depth

        fns.add(stochastic_depth)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return fns


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


def torchvision_model(name: str, num_classes: int = 1000, *, meta: bool = False) -> nn.Module:
    """Instantiate a torchvision classification model with random weights (nothing is downloaded).

    Args:
        name: a classification model of `torchvision.models`.
        num_classes: outputs of the classifier.
        meta: create parameters and buffers on the meta device: shapes only, nothing allocated or
            initialised, whatever the model's size.
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
    if not meta:
        return torchvision.models.get_model(name, **kwargs).eval()
    with _MetaParameters():
        model = torchvision.models.get_model(name, **kwargs)
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
        ArchitectureTooLarge: the traced network is beyond one of the IR's cost bounds.
    """
    module = torchvision_model(name, meta=True)
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
            graph_module = fx.symbolic_trace(module)
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


class _FxConverter:
    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.alias: dict[str, str] = {}  # fx node name -> IR tensor name
        self.layers: list[Layer] = []
        self.used_names: set[str] = set()
        self.noop_functions = _inference_noop_functions()

    def convert(self) -> tuple[list[Layer], list[str]]:
        outputs: list[str] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.alias[node.name] = NETWORK_INPUT
            elif node.op == "output":
                outputs = [self._ref(arg) for arg in _flatten_args(node.args[0])]
            elif node.op == "get_attr":
                raise UnsupportedOperator(
                    "get_attr", node.name, f"the module reads tensor attribute {node.target!r} in forward"
                )
            else:
                self._convert_node(node)
        return self.layers, outputs

    def _ref(self, arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            raise UnsupportedOperator("constant", str(arg), "only tensors produced by layers can be inputs")
        return self.alias[arg.name]

    def _unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name = f"{base}:{k}"
            k += 1
        self.used_names.add(name)
        return name

    def _convert_node(self, node: fx.Node) -> None:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, _INFERENCE_NOOP_MODULES):
                self.alias[node.name] = self._ref(node.args[0])
                return
            op, attrs = self._module_op(node, module)
            base = str(node.target)
        elif node.op == "call_function":
            if node.target in self.noop_functions:
                self.alias[node.name] = self._ref(node.args[0])
                return
            if node.target is torch.cat and len(node.args[0]) == 1:  # type: ignore[arg-type]
                self.alias[node.name] = self._ref(node.args[0][0])  # type: ignore[index]
                return
            op, attrs = self._function_op(node)
            base = node.name
        elif node.op == "call_method":
            if node.target in _INFERENCE_NOOP_METHODS:
                self.alias[node.name] = self._ref(node.args[0])
                return
            op, attrs = self._method_op(node)
            base = node.name
        else:  # pragma: no cover - fx has no other node kinds
            raise UnsupportedOperator(node.op, node.name)
        inputs = attrs.pop("inputs")
        in_shape = _tensor_shape(inputs[0])
        out_shape = _tensor_shape(node)
        name = self._unique_name(base)
        in_channels = attrs.pop("in_channels", in_shape[1])
        try:
            layer = Layer(
                name=name,
                op=op,
                inputs=[self._ref(arg) for arg in inputs],
                in_channels=in_channels,
                out_channels=out_shape[1],
                in_hw=_hw(in_shape),
                out_hw=_hw(out_shape),
                **attrs,
            )
        except ValidationError as exc:
            raise InvalidArchitecture.from_validation_error(exc) from exc
        self.layers.append(layer)
        self.alias[node.name] = name

    def _module_op(self, node: fx.Node, module: nn.Module) -> tuple[Op, dict[str, Any]]:
        where = str(node.target)
        inputs = [node.args[0]]
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
            return Op.LINEAR, {"inputs": inputs, "bias": module.bias is not None}
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
        raise UnsupportedOperator(type(module).__name__, where)

    def _function_op(self, node: fx.Node) -> tuple[Op, dict[str, Any]]:
        target = node.target
        if target in (operator.add, torch.add, operator.iadd):
            return Op.ADD, {"inputs": self._tensor_args(node, "add")}
        if target in (operator.mul, torch.mul, operator.imul):
            return Op.MUL, {"inputs": self._tensor_args(node, "mul")}
        if target in _ACTIVATION_FUNCTIONS:
            return _ACTIVATION_FUNCTIONS[target], {"inputs": [node.args[0]]}
        if target is torch.cat:
            return self._concat(node)
        if target is torch.flatten:
            return self._flatten(node, node.args[1:], node.kwargs)
        if target is F.adaptive_avg_pool2d:
            return Op.ADAPTIVE_AVGPOOL2D, {"inputs": [node.args[0]]}
        if target in (F.avg_pool2d, F.max_pool2d):
            return self._functional_pool(node, Op.AVGPOOL2D if target is F.avg_pool2d else Op.MAXPOOL2D)
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
            return op, {"inputs": self._tensor_args(node, method)}
        raise UnsupportedOperator(f"Tensor.{method}", node.name)

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
