"""W-Gates: latency-budgeted channel pruning (Li et al., 2020, "Weight-dependent Gates for Differentiable
Neural Network Pruning").

Modules, from the bottom up:

- `options`: every option's default, bounds and description (`OptionSpec`), the modes and the train
  mode's allocations; the REST API and the command lines derive their fields from it.
- `wgates`: gate networks that score a channel group's filters from their weights, binarised with a
  straight-through estimator and applied to a module by forward hooks.
- `capacity`: the differentiable capacity proxy the planner maximises.
- `budget`: the latency constraint (augmented Lagrangian) and the staircase-aware rounding.
- `allocation`: the band around the uniform keep ratio that every mode's plans stay in.
- `problem`: `PlanningProblem`, what a plan needs about one network and one predictor.
- `datafree`: inputs synthesised from BatchNorm statistics and the output-matching objective.
- `planner`: `plan(...)` for the architecture-only and weights modes, with the verification loop.
- `supervised`: SGD epochs under a cosine schedule, accuracy, BatchNorm recalibration.
- `training`: `train_and_prune(...)`, W-Gates trained jointly with the network on a dataset.
- `criteria`: baselines (uniform, L1, Taylor) and latency matching by bisection.
- `result`, `chart`: the JSON-serialisable `PlanResult` and its per-layer latency chart.

This package's `__init__` imports nothing on purpose: `lpnet.pruning` imports `lpnet.errors`,
and the planner imports `lpnet.pruning`; eager imports here would make that a cycle.
"""
