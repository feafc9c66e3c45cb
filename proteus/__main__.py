"""``python -m proteus`` (what ``torchrun -m proteus`` runs)."""

import sys

from proteus.cli import main

sys.exit(main())
