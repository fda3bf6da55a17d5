"""`python -m dpokit ...` is the same as the `dpokit` command."""

import sys

from dpokit.cli import main

sys.exit(main())
