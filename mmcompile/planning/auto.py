"""Choosing the schedule: the whole graph or the branch-parallel stages (``schedule="auto"``).

The parallel candidate costs a second compilation (every branch stage, on top of the whole
graph), so ``auto`` first asks whether it could pay: the whole graph is timed with every core,
and as N copies side by side on N workers with a worker's share of the cores each (what
concurrent branches pay: fewer cores, shared caches and memory bandwidth); the branches'
share of the work is read off their FLOPs and bytes, and
:func:`~.parallel.plan_parallel` predicts the parallel wall time from those. Kernels
that scale well across cores (TVM's, on 2 cores) make one core per branch slower than the
branches one after another with both; only when the prediction beats the whole graph are the
stages compiled and both candidates timed, the faster kept. Measured on the multimodal suite
(2 cores): MOSEI-TFN compiled in 13.2 s with both candidates, 7.4 s with the whole graph
alone; two side-by-side copies took 1.6-2.6x one copy's time with both cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mmcompile.planning.costs import estimate_cost_ms, stage_costs
from mmcompile.planning.moves import choose_moves
from mmcompile.planning.parallel import plan_parallel
from mmcompile.planning.partition import StagePlan
from mmcompile.planning.plan import Plan
from mmcompile.runtime import CompiledModel, Stage
from mmcompile.schedule import Schedule

# Compile the staged candidate when its predicted time is under this multiple of the whole
# graph's. The prediction is optimistic: in two suite runs (24 compiles, 2 cores) it came
# within 15% of the whole graph four times (MOSEI-TFN and Whisper at batch 1, CLIP at
# batch 8), and each race that followed measured the parallel schedule 1.58-1.67x slower.
# At 1.0, MOSEI-TFN batch 8 still raced in about half its compiles (predicted 2.3-2.7 ms
# against the whole graph's 2.3-2.8, the prediction moving with the host's noise): the race
# measured parallel 4.24 ms vs 2.77 and doubled the compile time (10 -> 22 s, over
# torch.compile's). Only a predicted win of 20% or more now costs the second compilation.
PROSPECT = 0.8


def _best_median_ms(run: Callable[[], object], runs: int = 11, blocks: int = 3,
                    warm_s: float = 0.25) -> float:
    """Best of ``blocks`` medians of ``runs`` calls, after ``warm_s`` of warm-up: a burst of
    load on a shared machine spoils a block, not the figure. (A freshly compiled model runs
    slower for its first few hundred calls: MOSEI-TFN 0.42 ms, then 0.32 ms.)"""
    deadline = time.perf_counter() + warm_s
    for _ in range(300):
        run()
        if time.perf_counter() > deadline:
            break
    medians = []
    for _ in range(blocks):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        medians.append(float(np.median(times)))
    return min(medians)


def side_by_side(whole: CompiledModel, feeds: Mapping[str, np.ndarray], workers: int,
                 threads: int) -> tuple[float, float]:
    """The whole graph's time with every core on the calling thread, and with ``workers``
    copies of it running at once on workers of ``threads`` threads each, as the branches
    would run: ``(all_cores_ms, side_by_side_ms)``. The second includes what concurrent
    branches pay on top of fewer cores: shared caches and memory bandwidth, handing work to
    the workers. (One copy alone, when the target cannot replicate its executable.)"""
    all_cores_ms = _best_median_ms(lambda: whole.run(feeds))
    (stage,) = whole.stages
    copies = [stage.executable] + [stage.executable.replica() for _ in range(workers - 1)]
    if any(copy is None for copy in copies):
        copies = copies[:1]
    stages = [Stage(f"copy {i}", stage.target, stage.inputs, stage.outputs, copy)
              for i, copy in enumerate(copies)]
    twin = CompiledModel(whole.signature, stages, whole.target,
                         schedule=Schedule("parallel", [[s.name] for s in stages],
                                           [threads] * len(stages)))
    try:
        side_ms = _best_median_ms(lambda: twin.run(feeds))
    finally:
        twin.close()
    return all_cores_ms, side_ms


def parallel_prospect(whole: CompiledModel, plans: Sequence[StagePlan],
                      feeds: Mapping[str, np.ndarray], cores: int, measure: bool) -> Schedule:
    """The parallel schedule ``plans`` would get, with its predicted wall time: each stage's
    share of the work (FLOPs and bytes) of the whole graph's measured time, slowed by what
    :func:`side_by_side` measured (perfect scaling when not measuring).

    Returns:
        a :class:`Schedule` whose ``estimate_ms`` is the prediction and whose ``measured_ms``
        holds the whole graph's times (``sequential``: every core; ``N side by side``: N
        copies at once, a worker's share of the cores each); kind ``sequential`` when
        nothing could overlap.
    """
    order = [p.name for p in plans]
    deps = {p.name: list(p.depends_on) for p in plans}
    share = {p.name: max(estimate_cost_ms(p.graph), 1e-6) for p in plans}
    unmeasured = plan_parallel(order, deps, share, cores)
    if not measure or unmeasured.kind != "parallel":
        return unmeasured
    n_workers, per_worker = len(unmeasured.workers), min(unmeasured.threads)
    all_ms, worker_ms = side_by_side(whole, feeds, n_workers, per_worker)
    at_share = worker_ms / all_ms

    def slowdown(k: int) -> float:  # measured at per_worker and at every core; linear between
        if k <= per_worker:
            return at_share * per_worker / k
        return at_share + (1.0 - at_share) * (k - per_worker) / (cores - per_worker)

    total = sum(share.values())
    costs = {name: all_ms * value / total for name, value in share.items()}
    candidate = plan_parallel(order, deps, costs, cores, slowdown)
    candidate.measured_ms = {"sequential": all_ms,
                             f"{n_workers} side by side": worker_ms}
    return candidate


def promising(prospect: Schedule) -> bool:
    """Whether the parallel candidate is worth compiling and timing: only on a measured
    prediction (under perfect scaling, the estimate without measuring, splitting the cores
    never beats the branches one after another) under ``PROSPECT`` x the whole graph's time."""
    sequential_ms = prospect.measured_ms.get("sequential")
    return (prospect.kind == "parallel" and sequential_ms is not None
            and prospect.estimate_ms < PROSPECT * sequential_ms)


def parallel_schedule(compiled: CompiledModel, feeds: Mapping[str, np.ndarray],
                      plans: Sequence[StagePlan], cores: int, measure: bool = True) -> Schedule:
    """The parallel schedule of ``compiled``'s stages, planned from their costs (see
    :func:`~.costs.stage_costs`) on cpu and device lanes; sequential when nothing can
    overlap."""
    costs = stage_costs(compiled, plans, feeds, measure)
    order = [s.name for s in compiled.stages]
    deps = {s.name: s.depends_on for s in compiled.stages}
    return plan_parallel(order, deps, costs, cores,
                         devices={s.name: s.device for s in compiled.stages})


def faster(staged: CompiledModel, whole: CompiledModel, feeds: Mapping[str, np.ndarray],
           say: Callable[[str], None]) -> CompiledModel:
    """The staged model on its parallel schedule or the whole graph sequentially, whichever
    is faster on ``feeds``; the other is closed (``staged`` may be ``whole`` itself, under
    its parallel schedule).

    The whole graph is timed first, before any worker thread exists (idle or exiting workers
    slowed it 10-40%), then the parallel schedule."""
    parallel = staged.schedule
    if staged is whole:
        whole.schedule = Schedule("sequential")
    measured = {"sequential": _best_median_ms(lambda: whole.run(feeds))}
    staged.schedule = parallel
    measured["parallel"] = _best_median_ms(lambda: staged.run(feeds))
    chosen = staged if measured["parallel"] < measured["sequential"] else whole
    if staged is not whole:
        (whole if chosen is staged else staged).close()
    if chosen is whole and measured["parallel"] >= measured["sequential"]:
        whole.schedule = Schedule("sequential", estimate_ms=parallel.estimate_ms,
                                  bound_ms=parallel.bound_ms)
    chosen.schedule.measured_ms = measured
    say(f"schedule: {chosen.schedule.kind} (parallel {measured['parallel']:.2f} ms, "
        f"whole graph sequential {measured['sequential']:.2f} ms)")
    return chosen


Build = Callable[[Sequence[StagePlan]], CompiledModel]


def choose(plan: Plan, build: Build, kind: str, feeds: Mapping[str, np.ndarray], cores: int,
           measure: bool, say: Callable[[str], None]) -> CompiledModel:
    """The compiled model and its schedule for ``kind`` (``sequential``, ``parallel`` or
    ``auto``); ``build`` compiles a list of stage plans into a model.

    ``auto``: the graph compiled whole (one VM call, no stage boundaries), and the branch
    stages on their parallel schedule only when the whole graph's thread scaling says they
    could be faster (:func:`parallel_prospect`); then the faster of the two. A model that
    placement already cut into stages (a fallback stage, branches on other targets) is
    scheduled on its own stages instead: sequential, or parallel where that measures faster.

    A model whose target may lose branches to its host (an accelerator, see :mod:`.moves`)
    is placed first: its branch stages under the placement with the lowest modelled latency,
    sequential on the host (``auto``: the accelerator's stages are simulated there, so the
    host's wall time cannot rank schedules) or on the parallel schedule (``parallel``).
    """
    if kind != "sequential" and measure:
        moved = choose_moves(plan, build, feeds, say)
        if moved is not None:
            model, plans = moved
            if kind == "parallel":
                model.schedule = parallel_schedule(model, feeds, plans, cores, measure)
            return model
    if kind == "parallel" and plan.staged is not plan.whole:
        staged = build(plan.staged)
        say(f"scheduling {len(plan.staged)} stages (parallel)")
        staged.schedule = parallel_schedule(staged, feeds, plan.staged, cores, measure)
        return staged
    whole = build(plan.whole)
    if len(whole.stages) > 1:  # placement cut the model: its own stages, side by side if faster
        schedule = parallel_schedule(whole, feeds, plan.whole, cores, measure)
        if kind == "sequential" or schedule.kind != "parallel":
            whole.schedule = Schedule("sequential", estimate_ms=schedule.estimate_ms,
                                      bound_ms=schedule.bound_ms)
            return whole
        whole.schedule = schedule
        return whole if kind == "parallel" or not measure else faster(whole, whole, feeds, say)
    if kind == "sequential" or plan.staged is plan.whole:
        return whole
    say(f"estimating the parallel schedule of {len(plan.staged)} stages")
    prospect = parallel_prospect(whole, plan.staged, feeds, cores, measure)
    if not promising(prospect):
        whole.schedule = Schedule("sequential", estimate_ms=prospect.estimate_ms,
                                  bound_ms=prospect.bound_ms, measured_ms=prospect.measured_ms)
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in prospect.measured_ms.items())
        say(f"schedule: sequential (parallel predicted {prospect.estimate_ms:.2f} ms"
            + (f" from the whole graph at {times})" if times else ")")
            + "; branch stages not compiled")
        return whole
    staged = build(plan.staged)
    staged.schedule = parallel_schedule(staged, feeds, plan.staged, cores, measure)
    if staged.schedule.kind != "parallel":
        staged.close()
        return whole
    return faster(staged, whole, feeds, say)
