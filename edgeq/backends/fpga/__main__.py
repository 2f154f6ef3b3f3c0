"""`python -m edgeq.backends.fpga ...` runs the FPGA estimator's command line."""

from edgeq.backends.fpga.cli import main

main()
