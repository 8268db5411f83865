"""`python -m service` runs the `lpnet` command line."""

import sys

from service.cli import main

sys.exit(main())
