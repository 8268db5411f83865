"""Reliability under failure, on a real PostgreSQL: a killed worker, a restarted database, 20 submitters.

Three scenarios, each with real processes on loopback (`lpnet serve` and `lpnet worker` started as
subprocesses, clients in threads of this process):

- worker kill: two `lpnet worker` processes with a short lease; a plan job of a few seconds (resnet18
  at 64x64) is submitted, the worker that leased it is SIGKILLed while it plans, and the other worker
  takes the job over once the lease lapses and completes it;
- PostgreSQL restart under load: clients post profile batches through `profiler.sinks.HttpSink` (it
  retries with the same idempotency key and spools what it cannot deliver) while the cluster is
  restarted with ``pg_ctlcluster``; the API must report ready again and every batch must be stored
  exactly once;
- concurrent submitters: 20 agents (devices), each with two threads posting the same overlapping
  batches in opposite orders (a retry racing the original), then replaying every batch once more;
  every row must be stored exactly once and every replay must get the first answer back.

The measurements posted are real timings of a tiny residual network (service/testing/tiny.py), each
copied under many distinct sample keys: storage, not timing, is what these scenarios exercise.

The scenarios live in service/testing/ (worker_kill.py, db_restart.py, submitters.py);
tests/service/test_reliability.py runs them at a small size and asserts on them, and
``python -m bench.reliability`` runs them larger and prints and saves the figures to
bench/results/reliability.json. Restarting the cluster drops every connection to it, including those
of anything else using the server at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.predictor.artifact import load_predictor
from service.testing.db_restart import postgres_restart_under_load
from service.testing.postgres import PostgresCluster, scratch_database
from service.testing.processes import Processes, running_api
from service.testing.stored import store_device_predictor
from service.testing.submitters import concurrent_submitters
from service.testing.tiny import measure_tiny_profile
from service.testing.worker_kill import worker_kill

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "reliability.json"


def summarise_kill(outcome: dict[str, Any]) -> dict[str, Any]:
    """A worker-kill outcome without the plan's per-layer detail."""
    job = outcome["job"]
    result = job["result"] or {}
    return {
        "status": job["status"],
        "attempts": job["attempts"],
        "error": job["error"],
        "killed_worker_pid": outcome["killed_worker_pid"],
        "survivor_worker_pid": outcome["survivor_worker_pid"],
        "progress_when_killed": outcome["progress_when_killed"],
        "predicted_ms": (result.get("predicted") or {}).get("total_ms"),
        "budget_ms": result.get("budget_ms"),
        "widths": result.get("widths"),
        "lease_seconds": outcome["lease_seconds"],
        "seconds_submit_to_planning": outcome["seconds_submit_to_planning"],
        "seconds_kill_to_completion": outcome["seconds_kill_to_completion"],
    }


# The benchmark --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="worker-kill rounds")
    parser.add_argument("--clients", type=int, default=8, help="HttpSink clients during the restart")
    parser.add_argument("--batches", type=int, default=20, help="batches per restart client")
    parser.add_argument("--agents", type=int, default=20, help="concurrent agents (devices)")
    parser.add_argument("--agent-batches", type=int, default=20, help="overlapping batches per agent")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    cluster = PostgresCluster.find()
    if cluster is None:
        raise SystemExit("pg_ctlcluster and a cluster under /etc/postgresql are needed")
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    print("measuring the tiny network and fitting its predictor ...", flush=True)
    profile = measure_tiny_profile()
    network = network_from_torchvision("resnet18", (1, 3, 64, 64))
    budget = 0.6 * load_predictor(profile.fitted.artifact).predict(network).total_ms
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpnet-reliability-") as tmp, scratch_database() as url:
        workdir = Path(tmp)
        with Processes(workdir / "logs") as processes, running_api(processes, url, workdir / "data") as api:
            device_id, _ = api.register_device("kill-cpu", profile.context)
            store_device_predictor(url, device_id, profile.fitted)
            request = {
                "device": "kill-cpu",
                "architecture": {"torchvision": "resnet18", "input_shape": [1, 3, 64, 64]},
                "budget_ms": budget,
            }
            kills = []
            for round_ in range(args.kills):
                print(f"worker kill {round_ + 1}/{args.kills} ...", flush=True)
                kills.append(summarise_kill(worker_kill(api, processes, workdir / "data", request)))
            seconds = sorted(k["seconds_kill_to_completion"] for k in kills)
            results["worker_kill"] = {
                "rounds": kills,
                "succeeded": sum(k["status"] == "succeeded" for k in kills),
                "seconds_kill_to_completion_median": seconds[len(seconds) // 2],
            }
            print("PostgreSQL restart under load ...", flush=True)
            results["postgres_restart"] = postgres_restart_under_load(
                api,
                cluster,
                profile.context,
                profile.measurements,
                workdir,
                clients=args.clients,
                batches_per_client=args.batches,
                batch_rows=10,
            )
            print(f"{args.agents} concurrent agents ...", flush=True)
            results["concurrent_submitters"] = concurrent_submitters(
                api,
                profile.context,
                profile.measurements,
                agents=args.agents,
                batches_per_agent=args.agent_batches,
                batch_rows=20,
                overlap=10,
            )
    report = {
        "bench": "reliability",
        "date": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_before": [round(x, 2) for x in load_before]},
        "protocol": {
            "database": "PostgreSQL (local cluster) restarted with pg_ctlcluster --mode fast",
            "server": "one `lpnet serve` process (no embedded worker) on loopback; clients are threads here",
            "workers": f"{args.kills} rounds of two fresh `lpnet worker` processes, lease 2 s, poll 0.2 s; an "
            "architecture plan of resnet18 at 64x64 (predictor fitted on the tiny network), the worker that "
            "leased it SIGKILLed 0.3 s into planning; time from the kill to the plan's completion",
            "rows": "real timings of the tiny network, copied under distinct sample keys",
            "restart": f"{args.clients} HttpSink clients x {args.batches} batches of 10 rows, 20 ms between "
            "rows; restart once 30 % of the batches were stored",
            "concurrent": f"{args.agents} agents x 2 threads posting {args.agent_batches} batches of 20 rows "
            "(10 shared with the next batch) in opposite orders, then every batch replayed once",
        },
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
