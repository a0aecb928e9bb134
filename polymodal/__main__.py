"""``python -m polymodal`` (also under ``torchrun -m polymodal``)."""

import sys

from polymodal.cli import main

sys.exit(main())
