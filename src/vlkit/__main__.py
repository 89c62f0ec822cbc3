"""``python -m vlkit`` runs the command line (also what ``torchrun -m vlkit`` launches)."""

import sys

from vlkit.cli import main

sys.exit(main())
