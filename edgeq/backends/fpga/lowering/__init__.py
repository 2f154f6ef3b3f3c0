"""How the lower-to-integer pass (edgeq.backends.fpga.lower_to_integer) builds the fpga datapath.

    options.py    LoweringOptions: the specs and choices of one lowering run
    ranges.py     calibrated ranges, the dry run that records which are needed, collecting the
                  missing ones (with rotated tensors) and GPTQ's second moments
    forms.py      the integer form of a tensor (dtype, power-of-two scale) and shift exponents
    scales.py     scale choice: int8 (per tensor or channel), int16 and int32-grid scales
    state.py      Lowering: what a run has built so far, and the helpers rules share
    rules.py      the dispatch tables (role, op kind -> rule) over the rule modules:
                  linear.py, rotation.py, attention.py, residual.py, norms.py, gelu.py, movement.py
    driver.py     one run: the entry, every op by its rule, the exits, the program's probes
    splice.py     the result spliced into the graph: nodes, outputs, opset, metadata
The metadata keys are defined in edgeq.backends.fpga.metadata.
"""
