"""`python -m edgeq.cli`: the edgeq command line."""

import sys

from edgeq.cli import main

sys.exit(main())
