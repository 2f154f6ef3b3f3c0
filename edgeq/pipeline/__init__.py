"""Pass infrastructure: the pass protocol, the pass manager, the context passes read, and
instruments that observe a pipeline."""

from edgeq.pipeline.core import (DumpInstrument, Instrument, Pass, PassContext, PassManager, PassRecord,
                                 PassResult, TimingInstrument, VerifyInstrument)

__all__ = ["DumpInstrument", "Instrument", "Pass", "PassContext", "PassManager", "PassRecord", "PassResult",
           "TimingInstrument", "VerifyInstrument"]
