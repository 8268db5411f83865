"""A benchmark's figures as JSON, with when and on which machine they were taken."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from profiler.environment import cpu_signature


def save_figures(path: Path, figures: dict[str, Any]) -> None:
    """Write `figures` to `path` after the time, this CPU's signature and the load average; say where."""
    machine = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_signature": cpu_signature(),
        "load_average": os.getloadavg(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**machine, **figures}, indent=1))
    print(f"saved {path}")
