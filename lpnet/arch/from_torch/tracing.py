"""Tracing any nn.Module with torch.fx, and converting its shape-propagated graph into the IR."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.fx as fx
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from lpnet.arch.from_torch.attention import maxvit_modules
from lpnet.arch.from_torch.converter import convert_graph
from lpnet.arch.ir import InputShape, Network, architecture_error
from lpnet.errors import InvalidArchitecture, UnsupportedOperator

DEFAULT_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 224, 224)
# torch.fx patches nn.Module.__call__ and friends for the whole process while it traces: a second
# trace, or the shape propagation of one, running meanwhile sees the patches and fails. One trace
# (with its shape propagation) at a time per process.
_TRACE_LOCK = threading.Lock()


class _TraceInput(BaseModel):
    input_shape: InputShape


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every nn.LocalResponseNorm (subclasses too) and MaxViT's window
    partitions and attention as one module call each."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves: tuple[type[nn.Module], ...] = (nn.LocalResponseNorm, *maxvit_modules())
        return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)


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
    shape = checked_input_shape(input_shape)
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
    layers, outputs = convert_graph(graph_module)
    try:
        return Network(name=name, family=family, input_shape=shape, layers=layers, outputs=outputs)
    except ValidationError as exc:
        raise architecture_error(exc) from exc


def checked_input_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The shape checked against the IR's bounds before any tensor of it is made."""
    try:
        return _TraceInput(input_shape=tuple(shape)).input_shape
    except ValidationError as exc:
        raise architecture_error(exc) from exc


def _parameter_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
