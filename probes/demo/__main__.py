"""``python -m probes.demo``: run the demo training job (see :mod:`probes.demo.training`)."""

import sys

from probes.demo.training import main

sys.exit(main())
