from __future__ import annotations

import pytest

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.arch.ir import Network


@pytest.fixture(scope="session")
def resnet18_ir() -> Network:
    return network_from_torchvision("resnet18")
