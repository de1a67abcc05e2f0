"""Pass infrastructure: pass base class and registry, pipelines, context, instruments, manager,
and the shared pattern-rewrite driver."""

from mmcompile.transform.context import (CallbackInstrument, Instrument, IRDumpInstrument,
                                         PassContext, TimingInstrument)
from mmcompile.transform.manager import PassManager, PassRecord, resolve_pipeline
from mmcompile.transform.pass_base import (Pass, PassResult, get_pass, register_pass,
                                           registered_passes)
from mmcompile.transform.pipeline import (NAMED_PIPELINES, Fixpoint, PassSpec, Pipeline,
                                          parse_pipeline)

__all__ = [
    "CallbackInstrument", "Fixpoint", "Instrument", "IRDumpInstrument", "NAMED_PIPELINES", "Pass",
    "PassContext", "PassManager", "PassRecord", "PassResult", "PassSpec", "Pipeline",
    "TimingInstrument", "get_pass", "parse_pipeline", "register_pass", "registered_passes",
    "resolve_pipeline",
]
