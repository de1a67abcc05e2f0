"""Reference cycle counts from SCALE-Sim, for validating the cycle model (:mod:`.cost`).

SCALE-Sim (PyPI ``scalesim`` 3.x, scalesim-project/scale-sim-v3) is the systolic-array
simulator the issue names as the yardstick. It needs ``numpy < 2``, which this project does
not use, so it runs in its own virtual environment and this module talks to it through a
subprocess: the same file is the worker (``--worker``, importing only the standard library
and ``scalesim``) and the driver. Regenerate the recorded figures with::

    python3 -m venv /tmp/scalesim-venv
    /tmp/scalesim-venv/bin/pip install scalesim 'numpy<2'
    python targets/accel/scalesim_ref.py --python /tmp/scalesim-venv/bin/python \\
        --out tests/data/accel_scalesim.json

(about five minutes on one core: SCALE-Sim walks its demand matrices one cycle at a time).

What is recorded: SCALE-Sim's COMPUTE_REPORT per layer and array: "Total Cycles" and
"Stall Cycles"; ``compute_cycles`` = their difference, the array's cycles with SCALE-Sim's
fill/drain skew and weight preload but without memory stalls (the runs use 1 MiB SRAMs and
``InterfaceBandwidth: CALC``, so there are none). SCALE-Sim sizes a convolution's output as
``ceil((H - R + S) / S)``, one more than ONNX's ``floor((H - R) / S) + 1`` when the stride
does not divide the padded input; the layers are therefore given the input extent a
floor-mode convolution reads, ``(Ho - 1) * S + R``, which changes no output.

The layers are those of the benchmark suite at batch 1 (AV-MNIST's and MM-IMDb's
convolutions, the BERT / Whisper / MOSEI / CLIP projections) plus shapes that do not divide
any array; arrays 8x8, 16x16, 32x32 and a non-square 32x8, dataflows ``ws`` and ``os``
(and ``is`` on a few).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name, kind, then (M, K, N) for a GEMM or (H, W, C, F, kh, kw, stride, pad_h, pad_w) for an
# NCHW convolution at batch 1 (each pad on both sides).
LAYERS = [
    ("avmnist_image_conv1", "conv", (28, 28, 1, 16, 5, 5, 1, 2, 2)),
    ("avmnist_image_conv2", "conv", (14, 14, 16, 32, 5, 5, 1, 2, 2)),
    ("avmnist_image_conv3", "conv", (7, 7, 32, 64, 3, 3, 1, 1, 1)),
    ("avmnist_head_fc1", "gemm", (1, 128, 100)),
    ("mmimdb_image_conv1", "conv", (96, 96, 3, 32, 3, 3, 2, 1, 1)),
    ("mmimdb_image_conv2", "conv", (48, 48, 32, 64, 3, 3, 2, 1, 1)),
    ("mmimdb_image_conv3", "conv", (24, 24, 64, 128, 3, 3, 2, 1, 1)),
    ("mmimdb_image_conv4", "conv", (12, 12, 128, 128, 3, 3, 2, 1, 1)),
    ("bert_qkv", "gemm", (32, 128, 128)),
    ("bert_ffn1", "gemm", (32, 128, 512)),
    ("bert_ffn2", "gemm", (32, 512, 128)),
    ("whisper_conv1", "conv", (1, 100, 80, 128, 1, 3, 1, 0, 1)),
    ("mosei_text_proj", "gemm", (50, 300, 64)),
    ("clip_patch_embed", "conv", (64, 64, 3, 128, 8, 8, 8, 0, 0)),
    ("odd_gemm", "gemm", (100, 30, 20)),
    ("odd_conv", "conv", (13, 11, 5, 7, 3, 3, 1, 0, 0)),
]
ARRAYS = [(8, 8), (16, 16), (32, 32), (32, 8)]
DATAFLOWS = ("ws", "os")
# A few layers also in input-stationary (SCALE-Sim's third dataflow).
IS_LAYERS = ("bert_qkv", "odd_gemm", "avmnist_image_conv3")
# Layers whose 8x8 runs would take SCALE-Sim minutes (hundreds of thousands of cycles).
SKIP_8X8 = ("avmnist_image_conv1", "mmimdb_image_conv1", "mmimdb_image_conv2",
            "mmimdb_image_conv3", "mmimdb_image_conv4")


def conv_output(h: int, w: int, kh: int, kw: int, stride: int, pad_h: int,
                pad_w: int) -> tuple[int, int]:
    """ONNX (floor-mode) output size of a convolution."""
    return (h + 2 * pad_h - kh) // stride + 1, (w + 2 * pad_w - kw) // stride + 1


def gemm_shape(kind: str, dims: tuple[int, ...]) -> tuple[int, int, int]:
    """``(M, K, N)`` of a layer as the accelerator's GEMM (a convolution by im2col)."""
    if kind == "gemm":
        return tuple(dims)
    h, w, c, f, kh, kw, stride, pad_h, pad_w = dims
    oh, ow = conv_output(h, w, kh, kw, stride, pad_h, pad_w)
    return oh * ow, c * kh * kw, f


def runs() -> list[dict]:
    """Every (layer, array, dataflow) to simulate."""
    out = []
    for name, kind, dims in LAYERS:
        for rows, cols in ARRAYS:
            if (rows, cols) == (8, 8) and name in SKIP_8X8:
                continue
            flows = DATAFLOWS + (("is",) if name in IS_LAYERS else ())
            for flow in flows:
                out.append({"layer": name, "kind": kind, "dims": list(dims), "rows": rows,
                            "cols": cols, "dataflow": flow,
                            "gemm": list(gemm_shape(kind, dims))})
    return out


# -- the worker: runs inside SCALE-Sim's environment ---------------------------------------

_CONFIG = """[general]
run_name = run
[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: 1024
FilterSramSzkB: 1024
OfmapSramSzkB: 1024
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Bandwidth : 10
Dataflow : {dataflow}
MemoryBanks: 1
ReadRequestBuffer: 512
WriteRequestBuffer: 512
[layout]
IfmapCustomLayout: False
FilterCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 1
IfmapSRAMBankPort: 2
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 1
FilterSRAMBankPort: 2
[sparsity]
SparsitySupport : false
SparseRep : ellpack_block
OptimizedMapping : false
BlockSize : 8
RandomNumberGeneratorSeed : 40
[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""
# SCALE-Sim reads a layout file even when custom layouts are off; one neutral row.
_LAYOUT = ("Layer name, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t,\n"
           "l0, 1, 1, 1, 1, 1, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3,\n")


def _topology(run: dict) -> tuple[str, bool]:
    if run["kind"] == "gemm":
        m, k, n = run["dims"]
        return f"Layer, M, N, K,\nl0, {m}, {n}, {k},\n", True
    h, w, c, f, kh, kw, stride, pad_h, pad_w = run["dims"]
    oh, ow = conv_output(h, w, kh, kw, stride, pad_h, pad_w)
    # the input extent a floor-mode convolution reads (see the module docstring)
    eh, ew = (oh - 1) * stride + kh, (ow - 1) * stride + kw
    return ("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
            f"Num Filter, Strides,\nl0, {eh}, {ew}, {kh}, {kw}, {c}, {f}, {stride},\n"), False


def _simulate(run: dict, folder: Path) -> dict:
    from scalesim.scale_sim import scalesim  # only inside SCALE-Sim's environment

    (folder / "config.cfg").write_text(_CONFIG.format(**run))
    topology, is_gemm = _topology(run)
    (folder / "topology.csv").write_text(topology)
    (folder / "layout.csv").write_text(_LAYOUT)
    with contextlib.redirect_stdout(io.StringIO()):
        sim = scalesim(save_disk_space=True, verbose=False, config=str(folder / "config.cfg"),
                       topology=str(folder / "topology.csv"),
                       layout=str(folder / "layout.csv"), input_type_gemm=is_gemm)
        sim.run_scale(top_path=str(folder))
    with (folder / "run" / "COMPUTE_REPORT.csv").open() as handle:
        row = [v.strip() for v in list(csv.reader(handle))[1]]
    total, stalls = int(row[2]), int(row[3])
    return {**run, "total_cycles_with_prefetch": int(row[1]), "total_cycles": total,
            "stall_cycles": stalls, "compute_cycles": total - stalls,
            "overall_util": round(float(row[4]), 4), "mapping_efficiency": round(float(row[5]), 4)}


def _worker(source: str, target: str) -> None:
    from importlib.metadata import version
    todo = json.loads(Path(source).read_text())
    results = []
    for index, run in enumerate(todo):
        with tempfile.TemporaryDirectory(prefix="scalesim-") as folder:
            results.append(_simulate(run, Path(folder)))
        print(f"[{index + 1}/{len(todo)}] {run['layer']} {run['rows']}x{run['cols']} "
              f"{run['dataflow']}: {results[-1]['compute_cycles']}", file=sys.stderr)
    Path(target).write_text(json.dumps({"scalesim": version("scalesim"), "runs": results}))


# -- the driver: runs in mmcompile's environment -------------------------------------------

class ScaleSimError(RuntimeError):
    """SCALE-Sim could not be run (no such interpreter, not installed, or it failed)."""


def simulate(todo: list[dict], python: str, timeout: float = 1800) -> dict:
    """Run SCALE-Sim on ``todo`` (entries of :func:`runs`) with the interpreter ``python``
    (one that has ``scalesim`` and ``numpy<2``). Returns ``{"scalesim": version, "runs":
    [...]}``.

    Raises:
        ScaleSimError: the interpreter is missing or the worker failed (its stderr attached).
    """
    if not Path(python).is_file():
        raise ScaleSimError(f"no Python interpreter at {python}")
    with tempfile.TemporaryDirectory(prefix="scalesim-driver-") as folder:
        source, target = Path(folder) / "in.json", Path(folder) / "out.json"
        source.write_text(json.dumps(todo))
        done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(source),
                               str(target)], capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise ScaleSimError(f"SCALE-Sim failed (exit {done.returncode}):\n"
                                f"{done.stderr[-4000:]}")
        return json.loads(target.read_text())


def record(out: Path, python: str) -> Path:
    """Simulate every run of :func:`runs` and write the fixture ``out`` (atomically)."""
    result = simulate(runs(), python)
    data = {"generated_by": "python targets/accel/scalesim_ref.py --python <scalesim venv>",
            "scalesim": result["scalesim"],
            "note": "compute_cycles = SCALE-Sim 'Total Cycles' - 'Stall Cycles' (CALC "
                    "bandwidth, 1 MiB SRAMs); convolutions given the input extent a "
                    "floor-mode convolution reads",
            "runs": result["runs"]}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(dump(data))
    os.replace(tmp, out)
    return out


def dump(data: dict) -> str:
    """The fixture as JSON with one run per line (diffs stay readable)."""
    head = {k: v for k, v in data.items() if k != "runs"}
    lines = ",\n".join(f"  {json.dumps(run)}" for run in data["runs"])
    return json.dumps(head, indent=1)[:-2] + ',\n "runs": [\n' + lines + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=os.environ.get(
        "SCALESIM_PYTHON", "/tmp/scalesim-venv/bin/python"),
        help="an interpreter with scalesim and numpy<2 (default: $SCALESIM_PYTHON or "
             "/tmp/scalesim-venv/bin/python)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2]
                        / "tests" / "data" / "accel_scalesim.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    try:
        print(record(args.out, args.python))
    except ScaleSimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
