"""``python -m far_scale.cli``: the same as the ``far-scale`` command."""

import sys

from far_scale.cli import main

sys.exit(main())
