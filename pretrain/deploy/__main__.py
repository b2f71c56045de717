"""``python -m pretrain.deploy``: see :mod:`pretrain.deploy.cli`."""

import sys

from pretrain.deploy.cli import main

sys.exit(main())
