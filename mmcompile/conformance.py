"""Conformance: onnx's node tests for the ops multimodal models use, through three engines.

    python -m mmcompile.conformance [--ops Conv,Gemm] [--json out.json] [--workers 2]

Engines: ``mmcompile`` (:mod:`mmcompile.onnx_backend`, default pass pipeline), ``tvm`` (TVM's
ONNX importer + ``zero`` pipeline + ``tvm.compile`` on the same frozen model, no mmcompile
passes) and ``onnxruntime`` (the unmodified model). Outputs are compared exactly as onnx's
harness does (``BackendTest.assert_similar_outputs`` with each test's rtol/atol).

A test belongs to an op when its model is a single node of that op type; ``*_expanded``
variants (the op's function body) belong to the op of the test they expand. Each (test, engine)
runs in a worker process: a segfault loses only that task ("crashed"), a hang is killed after
``--timeout`` seconds ("timeout"), and workers are replaced every ``--max-tasks`` tasks.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mmcompile.process_pool import run_pool

# The op list; "Reduce*" and "*Pool" are fnmatch patterns.
OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "Relu", "Gelu", "Sigmoid", "Tanh",
       "Erf", "Softmax", "LayerNormalization", "Attention", "Concat", "Reshape", "Transpose",
       "Gather", "Slice", "Split", "Squeeze", "Unsqueeze", "Expand", "Where", "Reduce*", "*Pool",
       "Resize", "Cast", "Shape", "ConstantOfShape", "Range", "Einsum")
ENGINES = ("mmcompile", "tvm", "onnxruntime")
_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


@dataclass
class Outcome:
    """One test through one engine."""

    test: str
    op: str
    engine: str
    passed: bool
    reason: str = ""
    seconds: float = 0.0


# -- test selection ----------------------------------------------------------------------------

def load_cases() -> list[Any]:
    """onnx's node test cases (``onnx.backend.test.case.TestCase``, models and data in memory)."""
    import numpy as np
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators overflow on purpose (Cast tests)
        return load_model_tests(kind="node")


def ops_by_test(cases: Iterable[Any]) -> dict[str, str]:
    """test name -> op type: the single node's op, or for ``_expanded`` tests the base test's."""
    cases = list(cases)
    single = {c.name: c.model.graph.node[0].op_type for c in cases
              if len(c.model.graph.node) == 1}
    ops = {}
    for case in cases:
        op = single.get(case.name) or single.get(_EXPANDED.sub("", case.name))
        if op:
            ops[case.name] = op
    return ops


def select(cases: Iterable[Any], ops: Sequence[str] = OPS) -> list[tuple[str, Any]]:
    """(op, case) for the cases whose op matches one of ``ops`` (fnmatch patterns)."""
    cases = list(cases)
    by_test = ops_by_test(cases)
    chosen = []
    for case in cases:
        op = by_test.get(case.name)
        if op and any(fnmatch.fnmatchcase(op, pattern) for pattern in ops):
            chosen.append((op, case))
    return sorted(chosen, key=lambda pair: (pair[0], pair[1].name))


# -- engines (run inside the worker processes) -------------------------------------------------

def _feeds(model, inputs) -> dict[str, Any]:
    import numpy as np
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    # The harness hands 0-d tensors over as numpy scalars, which onnxruntime refuses.
    return {name: value if isinstance(value, (list, tuple)) else np.asarray(value)
            for name, value in zip(names, inputs)}


def _run_mmcompile(model, inputs, freeze: str) -> list[Any]:
    from mmcompile.onnx_backend import MMCompileBackend
    return MMCompileBackend.prepare(model, threads=1, freeze_kinds=tuple(freeze)).run(inputs)


def _tvm_outputs(value) -> list[Any]:
    import tvm
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_tvm_outputs(item))
    return out


def _run_tvm(model, inputs, freeze: str) -> list[Any]:
    """TVM alone: the same integer/bool freezing and shapes, no mmcompile passes."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from mmcompile.onnx_backend import freeze_inputs
    feeds = _feeds(model, inputs)
    frozen = freeze_inputs(model, feeds, tuple(freeze))
    mod = from_onnx(frozen, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        mod = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    args = [tvm.runtime.tensor(feeds[i.name]) for i in frozen.graph.input]
    return _tvm_outputs(vm["main"](*args))


def _run_onnxruntime(model, inputs, freeze: str) -> list[Any]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, _feeds(model, inputs))


_RUNNERS: dict[str, Callable[[Any, list[Any], str], list[Any]]] = {
    "mmcompile": _run_mmcompile, "tvm": _run_tvm, "onnxruntime": _run_onnxruntime}


def _reason(exc: BaseException) -> str:
    """A short, groupable reason: the first informative line, numbers kept, ANSI codes dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, AssertionError) and lines and lines[0].startswith("Not equal to tol"):
        return "wrong values"  # assert_allclose
    if isinstance(exc, AssertionError) and lines and lines[0].startswith("Output") \
            and "incorrect shape" in lines[0]:
        return "wrong shape"
    if isinstance(exc, AssertionError) and lines and lines[0].startswith("Items are not equal"):
        wanted = " ".join(lines[1:])
        return f"wrong dtype or output count ({wanted})" if wanted else "wrong dtype"
    first = lines[0] if lines else ""
    if type(exc).__name__ == "BackendFailure":
        return first.removeprefix("mmcompile failed: ")
    if len(lines) > 1 and type(exc).__module__.startswith("tvm"):
        first = lines[-1]  # TVM puts the traceback first and the message last
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def run_task(task: Mapping[str, Any]) -> tuple[bool, str, float]:
    """Run one test through one engine; returns (passed, reason, seconds). Runs in a worker."""
    import numpy as np
    import onnx
    from onnx.backend.test.runner import Runner
    start = time.perf_counter()
    try:
        model = onnx.load_from_string(task["model"])
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            outputs = _RUNNERS[task["engine"]](model, list(task["inputs"]), task["freeze"])
            outputs = [np.asarray(o) if not isinstance(o, (list, tuple)) else o for o in outputs]
            Runner.assert_similar_outputs(task["outputs"], outputs, task["rtol"], task["atol"])
    except Exception as exc:  # noqa: BLE001  (any failure of an engine is a failed test)
        return False, _reason(exc)[:300], time.perf_counter() - start
    return True, "", time.perf_counter() - start


# -- the measurement and its report ------------------------------------------------------------

def _task(engine: str, case: Any, freeze: str) -> dict[str, Any]:
    from onnx.backend.test.runner import _normalize_tensor
    inputs, outputs = case.data_sets[0]
    return {"engine": engine, "test": case.name, "model": case.model.SerializeToString(),
            "inputs": [_normalize_tensor(x) for x in inputs],
            "outputs": [_normalize_tensor(x) for x in outputs],
            "rtol": case.rtol, "atol": case.atol, "freeze": freeze}


def run_conformance(ops: Sequence[str] = OPS, engines: Sequence[str] = ENGINES,
                    tests: str | None = None, workers: int = 2, timeout: float = 120.0,
                    max_tasks: int = 150, freeze: str = "iub",
                    progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run the node tests of ``ops`` through ``engines``.

    Args:
        ops: op types or fnmatch patterns (``Reduce*``).
        engines: a subset of :data:`ENGINES`.
        tests: optional regex; only test names it searches are run.
        workers: worker processes.
        timeout: seconds before a task is killed and counted as failed.
        max_tasks: tasks per worker before it is replaced (bounds leaked memory).
        freeze: numpy dtype kinds of the inputs frozen to constants for ``mmcompile`` and
            ``tvm`` (``i`` int, ``u`` unsigned, ``b`` bool).
        progress: called with a line per finished task.

    Returns:
        One :class:`Outcome` per (test, engine).
    """
    unknown = [e for e in engines if e not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    chosen = [(op, c) for op, c in select(load_cases(), ops)
              if tests is None or re.search(tests, c.name)]
    # Only the data sets the harness runs (the first) are shipped to the workers.
    tasks = [_task(engine, case, freeze) for _, case in chosen for engine in engines]
    meta = [(op, case.name, engine) for op, case in chosen for engine in engines]

    def report(index: int, result: tuple[bool, str, float]) -> None:
        if progress:
            _, name, engine = meta[index]
            status = "ok" if result[0] else f"FAIL {result[1]}"
            progress(f"[{engine}] {name}: {status} ({result[2]:.2f} s)")

    results = run_pool(run_task, tasks, workers, timeout, max_tasks, report)
    return [Outcome(name, op, engine, *result) for (op, name, engine), result in zip(meta, results)]


def summarize(outcomes: Sequence[Outcome], engines: Sequence[str] = ENGINES) -> str:
    """Per-op table (tests, passed per engine) and mmcompile's distinct failure reasons."""
    from mmcompile.report import format_table
    tests: dict[str, set[str]] = collections.defaultdict(set)
    passed: collections.Counter[tuple[str, str]] = collections.Counter()
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        tests[o.op].add(o.test)
        passed[o.op, o.engine] += o.passed
        if o.engine == "mmcompile" and not o.passed:
            reasons[o.op][o.reason] += 1
    rows = [[op, len(tests[op])] + [passed[op, e] for e in engines] for op in sorted(tests)]
    rows.append(["TOTAL", sum(len(t) for t in tests.values())]
                + [sum(passed[op, e] for op in tests) for e in engines])
    lines = [format_table(["op", "tests"] + list(engines), rows)]
    if "mmcompile" in engines and reasons:
        lines += ["", "mmcompile failures by op (count x first line of the error):"]
        for op in sorted(reasons):
            lines.append(f"  {op}:")
            lines += [f"    {n:3d} x {r}" for r, n in reasons[op].most_common()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcompile.conformance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true",
                        help="print the per-op table with failure reasons (the default)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated op types or fnmatch patterns (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--tests", help="regex on test names")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per task")
    parser.add_argument("--freeze", default="iub", help="dtype kinds of inputs frozen to "
                        "constants: i(nt), u(nsigned), b(ool) (default: %(default)s)")
    parser.add_argument("--json", help="write every outcome to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per task")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    start = time.perf_counter()
    outcomes = run_conformance([o for o in args.ops.split(",") if o], engines, args.tests,
                               args.workers, args.timeout, freeze=args.freeze,
                               progress=(lambda line: print(line, flush=True))
                               if args.verbose else None)
    elapsed = time.perf_counter() - start
    print(summarize(outcomes, engines))
    print(f"\n{len(outcomes)} runs in {elapsed:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "outcomes": [asdict(o) for o in outcomes]}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
