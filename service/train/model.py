"""The module `lpnet train` prunes: the small ResNet or a torchvision model shaped for the data, with
starting weights read from a safetensors file (never a pickle)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lpnet.arch.from_torch import network_from_module, torchvision_model
from lpnet.arch.ir import Network
from service.errors import InvalidInput
from service.train import SMALL_RESNET
from service.train.datasets import DataLoaders
from service.train.smallnet import SmallResNet, SmallResNetConfig

# Keys named one by one when weights do not fit.
LISTED_KEYS = 5


def build_model(name: str, data: DataLoaders, weights: Path | None = None) -> tuple[nn.Module, Network]:
    """The module to prune and its IR: `SMALL_RESNET` or a torchvision model name, for `data`'s
    channels and classes, with `weights` loaded when given.

    Raises:
        InvalidInput: a torchvision model for images that are not 3-channel, or weights that cannot be
            read or do not fit.
        UnknownModel: no torchvision model of that name.
    """
    channels = data.input_chw[0]
    if name == SMALL_RESNET:
        module: nn.Module = SmallResNet(SmallResNetConfig(in_channels=channels, num_classes=data.num_classes))
    else:
        if channels != 3:
            raise InvalidInput(
                f"torchvision models take 3-channel images, the dataset has {channels}; use {SMALL_RESNET}",
                {"model": name, "channels": channels},
            )
        module = torchvision_model(name, num_classes=data.num_classes)
    if weights is not None:
        load_weights(module, weights)
    network = network_from_module(module, (1, *data.input_chw), name=name, family=name)
    return module, network


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a state dict saved as safetensors into `module`, all keys matching.

    Raises:
        InvalidInput: the file is not safetensors, or its keys or shapes differ from the module's.
    """
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise InvalidInput(f"cannot read {path} as safetensors: {exc}", {"weights": str(path)}) from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = " ..." if len(keys) > LISTED_KEYS else ""
                parts.append(f"{label}: {', '.join(keys[:LISTED_KEYS])}{more}")
        raise InvalidInput(
            f"{path} does not fit the model {module.__class__.__name__} ({'; '.join(parts)})",
            {"weights": str(path)},
        )
    module.load_state_dict(state)
