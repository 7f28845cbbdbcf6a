"""``python -m statelab`` (used by ``torchrun -m statelab train SPEC``)."""

import sys

from statelab.cli import main

sys.exit(main())
