"""The FPGA-like accelerator: an int8 systolic array described by a small file, a tiler that
lowers quantized GEMMs, convolutions and max pools to a VTA-style instruction stream, a functional
simulator that runs the stream bit-exactly, and a cycle / energy model validated against
SCALE-Sim.

Modules, in the order data flows through them (each imports only those before it):

- :mod:`.spec`: :class:`~.spec.AccelSpec`, read from TOML or a preset (``vta-16x16``,
  ``gemmini-16x16``, ``edge-32x32``);
- :mod:`.layers`: the quantized layers it runs (:class:`~.layers.QGemm`,
  :class:`~.layers.QConv2d`, :class:`~.layers.QPool`) and their int8 reference semantics;
- :mod:`.isa`: the instruction stream (LOAD / GEMM / POOL / ALU / STORE on three queues with
  dependency tokens), saved and loaded atomically;
- :mod:`.dataflow`: folds, cycles and SRAM accesses of a GEMM tile on the array (ws/os/is);
- :mod:`.lowering`: :func:`~.lowering.supports` and :func:`~.lowering.lower`, the tiler;
- :mod:`.simulator`: :func:`~.simulator.run`, the functional simulator;
- :mod:`.cost`: :func:`~.cost.estimate`, cycles, utilization, DRAM bytes and energy;
- :mod:`.scalesim_ref`: runs SCALE-Sim (in its own environment) to record reference counts;
- :mod:`.importer`: a QDQ graph's layers, node by node (what placement asks);
- :mod:`.target`: the ``accel`` target (placement, compile, load);
- :mod:`.explore`: the cost model over a sweep of descriptions (``mmcompile explore``).

Only :mod:`.target` is imported here, to register the target: every module in ``targets/`` is
imported whenever targets load, in deployed processes too, so it imports no numpy, onnx or
TVM at module level.
"""

from mmcompile.targets.accel import target  # noqa: F401  (registers 'accel')
