"""The service's job handlers: each `JobKind` wired to the function that runs it.

Importing this module imports every handler (and through them torch and the planner); the server and
`lpnet worker` build their registry here and give it to their workers.
"""

from __future__ import annotations

from service.first_run.bootstrap import bootstrap_failed, run_bootstrap_job
from service.first_run.refine import refine_failed, run_refine_job
from service.jobs.kinds import JobKind
from service.jobs.registry import Task, TaskRegistry
from service.plans import plan_failed, run_plan_job
from service.predictors import fit_failed, run_fit_job


def default_registry() -> TaskRegistry:
    """Every job kind a worker on any machine runs."""
    return TaskRegistry(
        [
            Task(JobKind.FIT, run_fit_job, on_failure=fit_failed),
            Task(JobKind.PLAN, run_plan_job, on_failure=plan_failed),
        ]
    )


def serving_registry() -> TaskRegistry:
    """The default tasks plus those that must run on the server's own machine (its embedded workers).

    The first-run bootstrap and its refining rounds profile the machine they run on, so an
    `lpnet worker` elsewhere never claims them.
    """
    registry = default_registry()
    registry.register(Task(JobKind.BOOTSTRAP, run_bootstrap_job, on_failure=bootstrap_failed))
    registry.register(Task(JobKind.REFINE, run_refine_job, on_failure=refine_failed))
    return registry
