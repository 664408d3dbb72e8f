"""``python -m po_registry``: the ``po-registry`` command (also for ``torchrun -m`` and ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
