"""Model metadata keys that core code and more than one backend read (the one place they are
defined; a backend's own keys live in its package, e.g. edgeq.backends.fpga.metadata).

    HOST_OPS_KEY      JSON list of the ops the host runs ({name, op_type, why}): exempt from an
                      integer-only target's rule (targets.base.validate)
    INPUT_SHAPES_KEY  JSON {input: shape}: the shapes a cost estimate assumes for symbolic
                      inputs. Every compile records them (edgeq.frontend.shapes): the given
                      --input-shape, else those of the first calibration sample.
    TARGET_KEY, PROVIDER_KEY  the target and its execution a compile was for (eval and bench
                      run the model there by default)
    VERSION_KEY, SCHEME_KEY, OPTIONS_KEY, CALIBRATION_KEY, FLOAT_SHA256_KEY  provenance: the
                      edgeq version, the scheme (e.g. W8A8), the options given (JSON, the fields
                      that differ from the defaults), the calibration data (JSON: kind, source,
                      tokenizer/seq_len/windows for text, sample counts, held-out samples) and
                      the SHA-256 of the float model file (then its external data)
"""

import json
from typing import Mapping

HOST_OPS_KEY = "edgeq.host_ops"
# The target and the execution (provider) a model was compiled for: what eval and bench run it on.
TARGET_KEY = "edgeq.target"
PROVIDER_KEY = "edgeq.provider"
# The device of that execution it was compiled for (an NPU generation or SoC: --device), if any.
DEVICE_KEY = "edgeq.device"
INPUT_SHAPES_KEY = "edgeq.input_shapes"
# Provenance: what produced the model (the producer_name is "edgeq" too).
VERSION_KEY = "edgeq.version"
SCHEME_KEY = "edgeq.scheme"
OPTIONS_KEY = "edgeq.options"
CALIBRATION_KEY = "edgeq.calibration"
FLOAT_SHA256_KEY = "edgeq.float_model_sha256"
# Where models compiled before the key was target-neutral recorded the same shapes.
_OLDER_INPUT_SHAPES_KEYS = ("edgeq.fpga.input_shapes",)


def recorded_input_shapes(metadata: Mapping[str, str]) -> dict[str, list[int]]:
    """The input shapes a compile recorded in `metadata` (model metadata_props as a dict)."""
    for key in (INPUT_SHAPES_KEY, *_OLDER_INPUT_SHAPES_KEYS):
        if key in metadata:
            return {k: [int(d) for d in v] for k, v in json.loads(metadata[key]).items()}
    return {}
