"""Compiling the builds of a dynamic-range model (:mod:`mmcompile.dynamic`): the first ones in
this process, the last ones, where cores are idle, in worker processes (fresh interpreters:
``python -c``, not multiprocessing's spawn, which re-runs the caller's script unless it guards
its top level). Threads cannot share TVM's lowering: its TE tag scope is process-global
("nested op_tag is not allowed" with two builds in two threads).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from mmcompile.errors import MMCompileError
from mmcompile.profiles import DynamicDim, build_label


def build_profile(task: Mapping[str, Any]) -> tuple[bool, str, float]:
    """Compile one build and save it (in a worker process).

    Returns:
        (ok, error message, seconds).
    """
    from mmcompile.build import compile_static as compile_model
    start = time.perf_counter()
    try:
        compile_model(task["model"], None, verify=False, **task["options"]).save(task["out"])
    except MMCompileError as exc:
        return False, f"{type(exc).__name__}: {exc}", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which raises)
        return False, f"internal error: {type(exc).__name__}: {exc}", time.perf_counter() - start
    return True, "", time.perf_counter() - start


def spare_cores() -> int:
    """Cores no process is running on: the available cores less the 1-minute load average
    (which counts this process), as ``make --load-average`` does. A worker on a busy core only
    slows the builds beside it: on 2 shared cores at load 6, av_mnist's two builds took 41 s
    with a worker and 20 s one after the other."""
    from mmcompile.schedule import available_cores
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available: assume this process alone
        load = 1.0
    return max(0, int(available_cores() - max(load, 1.0)))


def pins(sizes: Mapping[str, int | None], dims: Sequence[DynamicDim]
          ) -> dict[str, dict[int, int]]:
    """input -> {axis: size} for a build's static sizes."""
    pins: dict[str, dict[int, int]] = {}
    for dim in dims:
        if sizes[dim.name] is not None:
            for input_name, axis in dim.inputs.items():
                pins.setdefault(input_name, {})[axis] = sizes[dim.name]
    return pins


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def pin(model: onnx.ModelProto, sizes: Mapping[str, Mapping[int, int]]) -> onnx.ModelProto:
    """A copy of ``model`` with input dims fixed: input -> {axis: size}; others left as they are.

    A symbol named at a pinned input axis takes its size in every intermediate and output shape;
    the rest of those shapes is kept, symbols and all, as the exporter wrote them. Shape
    inference alone would not give them back: a dim that passes through a computed ``Reshape``
    comes out as a fresh ``unk__N``, and rewrites that need two dims to be the same (the
    legalizer's row gather, CLIP's pooling) could no longer tell (a build with the batch left
    symbolic failed in TVM's importer that way).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    named: dict[str, int] = {}
    for info in graph_inputs(copy):
        for axis, size in sizes.get(info.name, {}).items():
            dim = info.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                named[dim.dim_param] = int(size)
            dim.Clear()
            dim.dim_value = int(size)
    for info in [*copy.graph.value_info, *copy.graph.output]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
            elif dim.dim_param in named:
                size = named[dim.dim_param]
                dim.Clear()
                dim.dim_value = size
    return copy


def _start_worker(tasks: list[dict[str, Any]], folder: Path, index: int) -> subprocess.Popen:
    """A worker process compiling ``tasks`` one after another. A fresh interpreter
    (``python -c``), not multiprocessing's spawn, which would re-run the caller's script
    unless it guards its top level with ``if __name__ == "__main__"``."""
    task_file = folder / f"worker{index}.pkl"
    task_file.write_bytes(pickle.dumps(tasks))
    log = open(folder / f"worker{index}.log", "wb")  # noqa: SIM115  (closed when it ends)
    # One thread each: the caller's own build uses the other cores.
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # torch blocked: the worker compiles an ONNX file, and apache-tvm-ffi would import torch
    # (~2 s) only to offer DLPack exchange with it; the worker's start-up is on the critical
    # path of a two-build compile (it finishes last).
    entry = ("import sys; sys.modules['torch'] = None; "
             "from mmcompile.dynamic_builds import worker_main; worker_main(sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", entry, str(task_file)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)
    log.close()
    return proc


def worker_main(task_file: str) -> None:
    """A worker process's entry: compile the pickled tasks, pickle their results beside."""
    tasks = pickle.loads(Path(task_file).read_bytes())
    results = [build_profile(task) for task in tasks]
    Path(task_file + ".out").write_bytes(pickle.dumps(results))


def compile_builds(builds: list[dict[str, int | None]], dims: Sequence[DynamicDim],
                   ranged: onnx.ModelProto, name: str, folder: Path,
                   options: Mapping[str, Any], measure: bool, workers: int,
                   say: Callable[[str], None]) -> tuple[list[Any], int]:
    """Compile every build: the last ones in worker processes (which must first import the
    compiler, a few seconds), the rest here meanwhile. Returns the models in ``builds`` order
    and the number of worker processes used.

    Raises:
        MMCompileError: a build failed (naming its sizes and the error).
    """
    from mmcompile.build import compile_static as compile_model
    from mmcompile.frontend import from_onnx_model
    from mmcompile.ir import PROTO_LIMIT
    from mmcompile.loading import load
    workers = max(0, min(workers, len(builds) - 1))
    remote = (len(builds) * workers) // (workers + 1) if workers else 0
    here = len(builds) - remote
    tasks = []
    for index, sizes in enumerate(builds[here:], here):
        path = folder / f"p{index}" / (name if name.endswith(".onnx") else f"{name}.onnx")
        path.parent.mkdir()
        model = pin(ranged, pins(sizes, dims))
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() >= PROTO_LIMIT)
        # Builds in workers estimate their schedule: measuring there would time kernels
        # against the other builds compiling beside them.
        tasks.append({"model": str(path), "out": str(folder / f"p{index}.mmc"),
                      "options": {**options, "measure": False}})
    shares = [tasks[w::workers] for w in range(workers)] if tasks else []
    procs = [_start_worker(share, folder, w) for w, share in enumerate(shares) if share]
    if procs:
        say(f"compiling {len(tasks)} of {len(builds)} builds in {len(procs)} worker process(es)")
    models: list[Any] = []
    try:
        for index, sizes in enumerate(builds[:here]):
            label = build_label(sizes)
            say(f"compiling build {label} ({index + 1}/{len(builds)})")
            graph = from_onnx_model(pin(ranged, pins(sizes, dims)), options.get("modalities"),
                                    name=name)
            # Each build measures its own schedule: which pays changes with the size (mm_imdb:
            # branches side by side at batch 1, the whole graph at batch 8; taking the first
            # build's answer ran batch 8 15% slower).
            try:
                models.append(compile_model(graph, None, verify=False,
                                            **{**options, "measure": measure},
                                            progress=lambda m, lb=label: say(f"[{lb}] {m}")))
            except MMCompileError as exc:
                raise in_case(exc, f"build {label}") from exc
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    results: dict[str, tuple] = {}
    for w, proc in enumerate(procs):
        code = proc.wait()
        out = folder / f"worker{w}.pkl.out"
        if code != 0 or not out.is_file():
            tail = (folder / f"worker{w}.log").read_text(errors="replace").strip()[-2000:]
            raise MMCompileError(f"a worker process compiling builds "
                                 f"{', '.join(t['out'] for t in shares[w])} exited with code "
                                 f"{code}:\n{tail}")
        for task, result in zip(shares[w], pickle.loads(out.read_bytes())):
            results[task["out"]] = result
    for index, task in enumerate(tasks, here):
        ok, error, seconds = results[task["out"]]
        label = build_label(builds[index])
        if not ok:
            raise MMCompileError(f"build {label} (in a worker process): {error}")
        say(f"build {label} compiled in a worker process in {seconds:.1f}s")
        models.append(load(task["out"], threads=options.get("threads", 0)))
    return models, len(procs)


def in_case(exc: MMCompileError, where: str) -> MMCompileError:
    """``exc`` with ``where`` (a build, a size) in front of its message, same class where its
    constructor takes a message."""
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # PassError, UnsupportedOpError: structured constructors
        return MMCompileError(f"{where}: {exc}")
