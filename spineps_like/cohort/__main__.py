"""``python -m spineps_like.cohort run|status ...`` (same as ``spineps-like cohort ...``)."""

import sys

from spineps_like.cohort.run import main

sys.exit(main())
