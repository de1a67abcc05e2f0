"""``mmcompile bench``: mmcompile against onnxruntime and PyTorch on multimodal workloads.

Modules, in the order data flows through them:

- :mod:`.suite`: the ``multimodal`` suite (six small MMBench-style models built from code and
  configs, random seeded weights, nothing downloaded), ``build(name, batch)`` and export to ONNX;
- :mod:`.flops`: FLOPs counted on the shape-inferred ONNX graph;
- :mod:`.harness`: the parent process: exports, inputs and reference outputs made once, one
  child process per (model, batch, engine), rows collected, ratios and geometric means;
- :mod:`.engines` and :mod:`.runner`: the child process (one engine: load or compile, first
  call, warm-up, timed runs, peak RSS);
- :mod:`.report`: terminal tables, JSON and the bar chart;
- :mod:`.command`: the ``mmcompile bench`` arguments.

Honest by construction: every engine sees the same inputs (one ``.npz`` written by the parent),
the same thread count, a fresh process with no warm cache (torch.compile's inductor cache points
at an empty folder), and its outputs are checked against one reference. Importing this package
is cheap: the CLI imports it to build its parser.
"""

from mmcompile.errors import MMCompileError


class BenchError(MMCompileError):
    """A benchmark request that cannot run: unknown model or engine, bad batch list, a model
    file whose batch dimension cannot take the requested size."""


__all__ = ["BenchError"]
