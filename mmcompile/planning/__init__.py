"""Planning: everything that decides where and how a model runs, in one place.

- :mod:`.plan`: the pipeline from a model to its stages, shared by ``compile`` and ``tune``;
- :mod:`.branches`: which modality branch each node belongs to;
- :mod:`.placement`: which target runs each node (capability, user placement, fallback);
- :mod:`.partition`: the placed graph cut into acyclic stages, one target each;
- :mod:`.costs`: stage costs, estimated from FLOPs and bytes or measured;
- :mod:`.parallel`: the parallel schedule of the stages on cpu and device lanes;
- :mod:`.auto`: ``schedule="auto"``, choosing between the whole graph and the branch stages;
- :mod:`.moves`: whole branches moved from an accelerator to its host when the modelled
  latency drops;
- :mod:`.timeline`: the modelled clock (accelerator stages modelled, host stages measured).

The runtime (:mod:`mmcompile.runtime`) executes the :class:`~mmcompile.schedule.Schedule` it is
given and plans nothing; targets compile the stages they are given.

What a stage boundary costs (why :mod:`.partition` merges every boundary the dependencies do
not force), measured on znver4, one process, interleaved rounds, medians:

- the call itself: a chain of 8 elementwise ops on [1, 4096] at 1 thread, 30.9 us whole, 38.3 us
  cut once and 56.2 us cut three times on the same target (7-9 us a boundary: a second VM
  call, the tensors handed over through DLPack, and the elementwise fusion across the cut);
- in a real model: the late-fusion example at 2 threads, 1.008 ms whole, +37 us with its last
  node forced into a stage of its own, +52 us as its 4 branch stages one after another (the
  round-to-round spread there is +-100 us: the figures say "tens of microseconds", no more).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmcompile._lazy import functions_over_modules, lazy_getattr

if TYPE_CHECKING:
    from mmcompile.planning.partition import StagePlan
    from mmcompile.planning.plan import Plan, plan

# Imported on first use: loading an artifact with a schedule override re-plans with
# :mod:`.parallel` alone, without the compiler side (onnx, networkx) that :mod:`.plan` needs.
_LAZY = {"StagePlan": "mmcompile.planning.partition", "Plan": "mmcompile.planning.plan"}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = ["Plan", "StagePlan", "plan"]

# ``plan`` is the function, though a module of that name exists
functions_over_modules(__name__, {"plan": "mmcompile.planning.plan"})
