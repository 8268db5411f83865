"""torchvision classification models by name: built with random weights, on the meta device when
only their shapes are needed, and traced into the IR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lpnet.arch.from_torch.tracing import DEFAULT_INPUT_SHAPE, checked_input_shape, network_from_module
from lpnet.arch.ir import Network
from lpnet.errors import InvalidArchitecture, UnknownModel


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
    kwargs = _model_arguments(name, num_classes, input_hw)
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


def _model_arguments(name: str, num_classes: int, input_hw: tuple[int, int] | None) -> dict[str, Any]:
    """The keyword arguments `torchvision.models.get_model` builds model `name` with."""
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
    return kwargs


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
    shape = checked_input_shape(input_shape)
    module = torchvision_model(name, meta=True, input_hw=(shape[2], shape[3]))
    return network_from_module(module, input_shape, name=name, family=name)
