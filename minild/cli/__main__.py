"""``python -m minild.cli``: what ``torchrun`` and ``accelerate launch`` start."""

import sys

from minild.cli import main

sys.exit(main())
