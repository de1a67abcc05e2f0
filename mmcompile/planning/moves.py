"""Branch moves: whole branches moved from an accelerator to its host CPU when the model's
modelled latency drops.

A target that names a host (``Target.host``) and lets the planner move branches to it
(``Target.branch_moves``: the accelerator's option ``branch_moves``, default true) keeps
every layer it runs unless the cost model says otherwise. On the modelled clock
(:mod:`.timeline`) its stages take their modelled time on the accelerator's lane and the
host's stages their measured time on the host's, side by side where the dependencies allow;
a branch the accelerator runs in small pieces between host operations can finish sooner run
whole on the host, beside the accelerator's other branches, than waiting its turn on both.

The search, greedy, from the placement as asked (at most 2B + 2 candidates built for B
branches):

1. the placement as asked is built (its branch stages) and costed: every host stage measured
   on the example inputs (:func:`~.costs.best_stage_times`), the accelerator's modelled;
2. each movable branch moved alone to its host;
3. from the best single move (when it gains ``MARGIN``), the other branches added one at a
   time in the order of their single moves' latencies, each kept when it gains again;
4. the best placement cut by target only instead of by branch (fewer stage boundaries,
   less overlap: with every branch on the host, the host's whole graph);
5. unless every branch moved already, every branch on the host, the graph whole (the other
   single-device placement);
6. the finalists (the placement as asked, everything on the host, and the ``FINALISTS``
   fastest so far) timed again in turn, a few rounds, each stage priced at its best over
   those rounds (so a burst of load while one candidate was first timed spoils no
   comparison), and the fastest kept when it beats the placement as asked by ``MARGIN``
   (host times measured on a loaded machine move by a few percent between runs). So on this
   clock the result is never slower than the accelerator as placed, nor more than
   ``MARGIN`` slower than the host alone.

Stages already built for an earlier candidate (same target, nodes and boundary) are reused,
compiled, so a candidate costs compiling its new stages (its moved branches on the host) and
timing its model, not compiling the whole model again.

Movable branches: the modality branches and the fusion branch with a node on such a target
that the user's placement does not name: a user's placement always wins, and placing a
branch on the accelerator explicitly (``placement={"audio": "accel"}``) keeps it there. (The
fusion moves too: on the MOSEI models its one large layer, 9537 x 128 weights streamed from
DRAM, takes the accelerators longer than the host.) No branch moves with
``schedule="sequential"`` (no branch analysis), ``measure=False`` (the host's measured times
are what decides) or the accelerator's ``branch_moves=false``.

The decision and its figures are in ``metadata["branch_moves"]`` (the manifest) and in each
moved stage's placement reason (the report): ``branch audio moved to cpu: modelled 0.41 ms vs
0.63 ms``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcompile.planning.costs import best_stage_times, modelled_costs
from mmcompile.planning.parallel import critical_path_ms
from mmcompile.planning.partition import StagePlan
from mmcompile.planning.plan import Plan, with_moves
from mmcompile.planning.timeline import modelled_latency_ms
from mmcompile.runtime import CompiledModel, Stage
from mmcompile.schedule import Schedule

# A move must lower the modelled latency by this share: the host's stage times, measured on
# a shared 2-core machine, differ by a few percent from one timing to the next.
MARGIN = 0.05
# Candidates timed again side by side before the choice, besides the placement as asked and
# everything on the host: the fastest few by their first timings.
FINALISTS = 2

Build = Callable[[Sequence[StagePlan]], CompiledModel]
StageKey = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def movable_branches(plan: Plan) -> dict[str, str]:
    """Branch -> the host key it would move to, for each branch the planner may move (see
    the module docstring); empty when none may."""
    placed = plan.placement
    user = set(plan.request.placement or {}) if plan.request else set()
    found: dict[str, str] = {}
    for node, branch in plan.branches.items():
        key = placed.nodes.get(node)
        host = placed.hosts.get(key)
        if (branch in found or host is None or node in user or branch in user
                or branch.split(".")[0] in user):
            continue
        choice = placed.choices[key]
        if choice.target.branch_moves(choice.options):
            found[branch] = host
    return dict(sorted(found.items()))


def _key(plan: StagePlan) -> StageKey:
    return plan.target, tuple(plan.nodes), tuple(plan.inputs), tuple(plan.outputs)


@dataclass
class Trial:
    """One candidate, built and timed: its moves and cut, plan, stages and model, the key
    of each stage (by name) and its modelled latency (ms, from the costs at hand)."""

    moves: dict[str, str]
    whole: bool
    plan: Plan
    plans: list[StagePlan]
    model: CompiledModel
    keys: dict[str, StageKey]
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"moves": self.moves, "stages": "whole" if self.whole else "branches",
                "modelled_ms": round(self.latency_ms, 4)}


class Candidates:
    """Candidate placements built and timed, sharing the stages they have in common: each
    candidate times all of its stages, a stage's cost is its best over the timings it had,
    and :meth:`cost` prices a candidate from the costs at hand."""

    def __init__(self, plan: Plan, build: Build, feeds: Mapping[str, np.ndarray]):
        self.plan, self.build, self.feeds = plan, build, feeds
        self.stages: dict[StageKey, Stage] = {}
        self.costs: dict[StageKey, float] = {}
        self.trials: list[Trial] = []
        self.signature, self.target, self.metadata = None, "", {}  # of the first build

    def model(self, plans: Sequence[StagePlan]) -> CompiledModel:
        """The model of ``plans``, compiling only the stages no candidate had."""
        missing = [p for p in plans if _key(p) not in self.stages]
        if missing:
            built = self.build(missing)
            self.stages.update((_key(p), s) for p, s in zip(missing, built.stages))
            if self.signature is None:
                self.signature, self.target, self.metadata = (built.signature, built.target,
                                                              built.metadata)
        stages = [dataclasses.replace(self.stages[_key(p)], name=p.name,
                                      depends_on=list(p.depends_on),
                                      info=dict(self.stages[_key(p)].info)) for p in plans]
        return CompiledModel(self.signature, stages, self.target, dict(self.metadata))

    def trial(self, moves: Mapping[str, str], whole: bool = False) -> Trial:
        """The plan with ``moves``, cut into branch stages (or by target only: ``whole``),
        built, timed and priced (:meth:`cost`)."""
        plan = with_moves(self.plan, moves) if moves else self.plan
        plans = list(plan.whole if whole else plan.staged)
        model = self.model(plans)
        keys = {s.name: _key(p) for s, p in zip(model.stages, plans)}
        measured = {**best_stage_times(model, self.feeds), **modelled_costs(model)}
        for name, key in keys.items():
            self.costs[key] = min(self.costs.get(key, float("inf")), measured[name])
        trial = Trial(dict(moves), whole, plan, plans, model, keys)
        self.cost(trial)
        self.trials.append(trial)
        return trial

    def retime(self, finalists: Sequence[Trial], rounds: int = 3) -> list[Trial]:
        """``finalists`` (duplicates dropped) timed again in turn, ``rounds`` times, and
        priced from those timings alone: each stage's best over the rounds. A stage timed
        with many earlier candidates had more chances at a quiet moment than one timed once;
        here every finalist's stages get the same chances, at the same moments."""
        unique = list({id(t): t for t in finalists}.values())
        fresh: dict[StageKey, float] = {}
        for _ in range(rounds):
            for trial in unique:
                measured = {**best_stage_times(trial.model, self.feeds, blocks=1, runs=5,
                                               warm_s=0.05), **modelled_costs(trial.model)}
                for name, key in trial.keys.items():
                    fresh[key] = min(fresh.get(key, float("inf")), measured[name])
        self.costs.update(fresh)
        for trial in unique:
            self.cost(trial)
        return unique

    def stage_costs(self, trial: Trial) -> dict[str, float]:
        """Stage name -> its cost (ms) in ``trial``."""
        return {name: self.costs[key] for name, key in trial.keys.items()}

    def cost(self, trial: Trial) -> float:
        """``trial``'s modelled latency from the costs at hand, its stages ordered as the
        modelled clock runs them (a sequential run is that order)."""
        trial.latency_ms, order = modelled_latency_ms(trial.model.stages,
                                                      self.stage_costs(trial))
        position = {name: i for i, name in enumerate(order)}
        trial.model.stages.sort(key=lambda s: position[s.name])
        return trial.latency_ms


def _label(moves: Mapping[str, str]) -> str:
    """``branch audio moved to cpu``, ``branches audio, video moved to cpu``."""
    by_host: dict[str, list[str]] = {}
    for branch, host in moves.items():
        by_host.setdefault(host, []).append(branch)
    return "; ".join(f"branch{'es' if len(b) > 1 else ''} {', '.join(b)} moved to {host}"
                     for host, b in by_host.items())


def choose_moves(plan: Plan, build: Build, feeds: Mapping[str, np.ndarray],
                 say: Callable[[str], None]) -> tuple[CompiledModel, list[StagePlan]] | None:
    """The model of the candidate placement with the lowest modelled latency (see the module
    docstring), on a sequential schedule whose ``estimate_ms`` is that latency; None when
    no branch may move (the caller plans as usual).

    Returns:
        The model (its stages' ``cost_ms`` set, the decision in ``metadata["branch_moves"]``)
        and its stage plans.

    Raises:
        TargetError, UnsupportedOpError: a candidate placement cannot be built.
    """
    movable = movable_branches(plan)
    if not movable:
        return None
    trials = Candidates(plan, build, feeds)
    say(f"weighing {len(movable)} branch move(s) to the host on the modelled clock: "
        + ", ".join(movable))
    base = trials.trial({})
    singles = {b: trials.trial({b: host}) for b, host in movable.items()}
    best, best_moves = base, {}
    for branch in sorted(singles, key=lambda b: singles[b].latency_ms):
        moves = {**best_moves, branch: movable[branch]}
        trial = singles[branch] if len(moves) == 1 else trials.trial(moves)
        if trial.latency_ms <= (1 - MARGIN) * best.latency_ms:
            best, best_moves = trial, moves
    if best.plan.whole is not best.plan.staged:
        trials.trial(best_moves, whole=True)
    if best_moves != movable:
        trials.trial(movable, whole=True)
    finalists = trials.retime([base, *(t for t in trials.trials if t.moves == movable
                                       and t.whole),
                               *sorted(trials.trials, key=lambda t: t.latency_ms)[:FINALISTS]])
    fastest = min(finalists, key=lambda t: t.latency_ms)
    best = fastest if fastest.latency_ms <= (1 - MARGIN) * base.latency_ms else base
    best_moves = best.moves
    costs = trials.stage_costs(best)
    latency, model = best.latency_ms, best.model
    decision = (f"{_label(best_moves)}: modelled {latency:.3f} ms vs {base.latency_ms:.3f} "
                f"ms" if best_moves else
                f"no branch moved: modelled {latency:.3f} ms as placed, best move "
                f"{min(t.latency_ms for t in trials.trials if t.moves):.3f} ms")
    say(f"branch moves: {decision}")
    moved = best.plan.placement.moved
    plans = {p.name: p for p in best.plans}
    for stage in model.stages:
        stage.info["cost_ms"] = round(costs[stage.name], 4)
        branches = sorted({moved[n] for n in plans[stage.name].nodes if n in moved})
        if branches:
            stage.info["placement"] = {**stage.info.get("placement", {}), "reason": (
                f"branch{'es' if len(branches) > 1 else ''} {', '.join(branches)} moved to "
                f"{best_moves[branches[0]]} by the cost model (modelled {latency:.3f} ms vs "
                f"{base.latency_ms:.3f} ms)")}
    model.metadata["branch_moves"] = {"moved": best_moves, "decision": decision,
                                      "modelled_ms": round(latency, 4),
                                      "as_placed_ms": round(base.latency_ms, 4),
                                      "candidates": [t.to_dict() for t in trials.trials]}
    order = [s.name for s in model.stages]
    deps = {s.name: s.depends_on for s in model.stages}
    model.schedule = Schedule("sequential", estimate_ms=latency,
                              bound_ms=critical_path_ms(order, deps, costs))
    return model, best.plans
