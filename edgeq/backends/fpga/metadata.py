"""The metadata keys through which an fpga-lowered model describes itself (the one place they are defined).

The lowering (edgeq.backends.fpga.lower_to_integer) writes them; the integer program, the FPGA
estimator (edgeq.backends.fpga.layers) and the fpga cost model read them.

    PROGRAM_KEY       model metadata: the datapath as an IntegerProgram's JSON
    HOST_OPS_KEY      model metadata: JSON list of the ops the host runs ({name, op_type, why})
    INPUT_SHAPES_KEY  model metadata: JSON {input: shape} of the first calibration sample, the
                      shapes an estimate assumes for symbolic inputs
    UNIT_KEY          node metadata of every emitted node: its hardware unit, "kind@instance"
"""

__all__ = ["HOST_OPS_KEY", "INPUT_SHAPES_KEY", "PROGRAM_KEY", "UNIT_KEY"]

from edgeq.metadata import HOST_OPS_KEY, INPUT_SHAPES_KEY  # shared with core code

PROGRAM_KEY = "edgeq.integer.program"
UNIT_KEY = "edgeq.unit"
