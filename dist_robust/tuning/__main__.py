"""``python -m dist_robust.tuning`` is ``dist-robust tune``."""

import sys

from dist_robust.tuning.cli import tune_main

sys.exit(tune_main())
