"""Model metadata keys that core code and more than one backend read (the one place they are
defined; a backend's own keys live in its package, e.g. edgeq.backends.fpga.metadata).

    HOST_OPS_KEY      JSON list of the ops the host runs ({name, op_type, why}): exempt from an
                      integer-only target's rule (targets.base.validate)
    INPUT_SHAPES_KEY  JSON {input: shape} of the first calibration sample: the shapes a cost
                      estimate assumes for symbolic inputs
"""

HOST_OPS_KEY = "edgeq.host_ops"
INPUT_SHAPES_KEY = "edgeq.fpga.input_shapes"
