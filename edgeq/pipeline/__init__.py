"""Pass infrastructure: the pass protocol and pass manager (core), the typed keys of what passes
hand each other (artifacts), and instruments that observe a pipeline (instruments)."""

from edgeq.pipeline.artifacts import ArtifactKey
from edgeq.pipeline.core import Instrument, Pass, PassContext, PassManager, PassRecord, PassResult, Task, leaf_records
from edgeq.pipeline.instruments import (DumpInstrument, ProgressInstrument, ReleasePagesInstrument, TimingInstrument,
                                        VerifyInstrument)

__all__ = ["ArtifactKey", "DumpInstrument", "Instrument", "Pass", "PassContext", "PassManager", "PassRecord",
           "PassResult", "ProgressInstrument", "ReleasePagesInstrument", "Task", "TimingInstrument", "VerifyInstrument",
           "leaf_records"]
