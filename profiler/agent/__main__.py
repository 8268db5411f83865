"""``python -m profiler.agent``: the device agent loop, as ``lpnet agent``."""

import sys

from profiler.agent.cli import main

sys.exit(main())
