"""python -m aigc_ray.cli: the same as the aigc-ray command."""

import sys

from . import main

sys.exit(main())
