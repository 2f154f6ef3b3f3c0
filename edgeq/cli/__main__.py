"""`python -m edgeq.cli`: the edgeq command line."""

import sys

from edgeq.cli.app import main

sys.exit(main())
