"""Subcommands of the `lpnet` CLI, one module per command group.

A command module defines ``register(subparsers)``, which adds its parser(s) and points
``set_defaults(handler=...)`` at a function ``(args, settings) -> exit code``. To add a command, write
such a module and list its ``register`` in `COMMAND_GROUPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.commands import agent, db, devices, fit, keys, plan, predict, profile, serve, train, worker

if TYPE_CHECKING:
    from service.commands._common import SubParsers

Registrar = Callable[["SubParsers"], None]

# In the order `lpnet --help` lists them.
COMMAND_GROUPS: tuple[Registrar, ...] = (
    serve.register,
    worker.register,
    db.register,
    devices.register,
    keys.register,
    profile.register,
    agent.register,
    fit.register,
    predict.register,
    plan.register,
    train.register,
)
