"""`python -m gateskip.training ...`, the form `accelerate launch -m` needs."""

import sys

from .command import main

sys.exit(main())
