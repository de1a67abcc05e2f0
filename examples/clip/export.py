#!/usr/bin/env python
"""Export the small random-weight CLIP example model to ONNX.

Usage (from the repo root, or anywhere):
    python examples/clip/export.py -o clip.onnx [--batch N] [--opset 18] [--dynamic-batch] [--no-optimize]

Writes only the file given by -o (weights are embedded, no external-data file).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_NAME = _HERE.name


def _load_model_module():
    # Load the sibling model.py by path under a unique module name, so this script
    # works from any cwd, without the package installed, and without clashing with
    # the other examples' `model.py` if several are loaded in one process.
    mod_name = f"_mmcompile_example_{_NAME}_model"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, _HERE / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def export(path: str | os.PathLike, batch: int = 1, opset: int = 18, dynamic_batch: bool = False,
           optimize: bool = True) -> Path:
    """Export to `path`. `optimize=False` skips torch.onnx's onnxscript graph optimizer
    (which otherwise folds constants and BatchNorm into Conv)."""
    m = _load_model_module()
    model = m.build_model()
    if dynamic_batch:
        # torch.export specialises size-1 dims, so trace a dynamic batch with batch >= 2.
        batch = max(batch, 2)
    inputs = m.example_inputs(batch)
    dynamic_shapes = None
    if dynamic_batch:
        b = torch.export.Dim("batch")
        dynamic_shapes = {name: {0: b} for name in inputs}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (),
        kwargs=inputs,
        f=str(path),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        output_names=list(getattr(m, "OUTPUT_NAMES", [])) or None,
        optimize=optimize,
        external_data=False,  # single self-contained .onnx file
        verbose=False,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    # Silence the exporter's "torchvision is not installed. Skipping torchvision::nms" noise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)  # torch-internal pytree deprecation
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="model.onnx", help="output .onnx path (default: model.onnx)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (default: 1)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    p.add_argument("--dynamic-batch", action="store_true", help="export with a symbolic batch dimension")
    p.add_argument("--no-optimize", action="store_true",
                   help="skip torch.onnx's built-in graph optimizer (keeps BatchNormalization, Constant nodes, ...)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = export(args.output, batch=args.batch, opset=args.opset,
                 dynamic_batch=args.dynamic_batch, optimize=not args.no_optimize)
    dt = time.perf_counter() - t0
    shape = "dynamic batch" if args.dynamic_batch else f"batch {args.batch}"
    print(f"wrote {out} ({_NAME}, {shape}, opset {args.opset}, {out.stat().st_size / 1e6:.1f} MB) in {dt:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
