"""`python -m edgeq.fpga ...` runs the FPGA estimator's command line."""

from edgeq.fpga.cli import main

main()
