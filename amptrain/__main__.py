"""`python -m amptrain` runs the command-line interface."""

from __future__ import annotations

import sys

from amptrain.cli import main

sys.exit(main())
