"""The branch-parallel scheduler and its cost model, on stage DAGs given by hand (no compiling).

Cost model under test (see :mod:`mmcompile.planning.parallel`): a stage costs ``cost`` ms with every
core and ``cost * cores / threads`` ms with fewer; roots (the branches) go longest-first onto
the least loaded worker; stages with dependencies (the fusion) run on the caller afterwards.
"""

import json
import os

import numpy as np
import pytest
from helpers import FLOAT, make_graph
from onnx import helper

from mmcompile.errors import MMCompileError
from mmcompile.planning.costs import estimate_cost_ms
from mmcompile.planning.parallel import critical_path_ms, plan_parallel
from mmcompile.schedule import SCHEDULES, Schedule, available_cores, check_kind


def fan_in(costs):
    """Every stage but ``fusion`` is a root; ``fusion`` reads them all."""
    order = [s for s in costs if s != "fusion"] + ["fusion"]
    deps = {s: [] for s in order}
    deps["fusion"] = order[:-1]
    return order, deps


def test_two_branches_one_per_worker():
    costs = {"image": 3.0, "text": 1.0, "fusion": 0.5}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=2)
    assert schedule.kind == "parallel"
    assert schedule.workers == [["image"], ["text"]]
    assert schedule.threads == [1, 1]
    # each branch on 1 of 2 cores takes twice its full-core time; the fusion follows
    assert schedule.estimate_ms == pytest.approx(2 * 3.0 + 0.5)
    assert schedule.bound_ms == pytest.approx(3.0 + 0.5)


def test_three_branches_longest_first_on_the_least_loaded_worker():
    costs = {"audio": 1.0, "image": 4.0, "text": 2.0, "fusion": 1.0}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=2)
    # image (longest) -> worker 0; text -> worker 1 (idle); audio -> worker 1 (less loaded)
    assert schedule.workers == [["image"], ["text", "audio"]]
    assert all("fusion" not in names for names in schedule.workers)  # fusion is the caller's
    assert schedule.threads == [1, 1]
    assert schedule.estimate_ms == pytest.approx(2 * 4.0 + 1.0)
    assert schedule.bound_ms == pytest.approx(4.0 + 1.0)
    assert schedule.bound_ms == critical_path_ms(order, deps, costs)


@pytest.mark.parametrize("cores", [2, 3, 4, 5, 8])
def test_threads_sum_to_the_cores(cores):
    costs = {"audio": 1.0, "image": 4.0, "text": 2.0, "fusion": 1.0}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=cores)
    assert len(schedule.workers) == min(cores, 3) == len(schedule.threads)
    assert sum(schedule.threads) == cores
    assert min(schedule.threads) >= 1
    assert sorted(s for names in schedule.workers for s in names) == ["audio", "image", "text"]
    # the spare cores go to the busiest worker, the one holding the longest branch
    busiest = next(i for i, names in enumerate(schedule.workers) if "image" in names)
    assert schedule.threads[busiest] == max(schedule.threads)


def test_estimate_uses_the_threads_it_assigns():
    costs = {"image": 3.0, "text": 1.0, "fusion": 0.5}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=3)
    assert schedule.threads == [2, 1]
    loads = [sum(costs[s] for s in names) * 3 / threads
             for names, threads in zip(schedule.workers, schedule.threads)]
    assert schedule.estimate_ms == pytest.approx(max(loads) + 0.5)  # 4.5 + 0.5


@pytest.mark.parametrize("cores", [2, 4, 16])
def test_perfect_scaling_never_favours_splitting_the_cores(cores):
    costs = {"image": 1.0, "text": 0.9, "audio": 0.4, "fusion": 0.1}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=cores)
    assert schedule.estimate_ms >= sum(costs.values())


def test_slowdown_is_what_a_worker_pays_for_fewer_cores():
    costs = {"image": 1.0, "text": 1.0, "fusion": 0.2}
    order, deps = fan_in(costs)
    # kernels that do not scale: a worker with one of two cores is only 1.2x slower
    poor = plan_parallel(order, deps, costs, cores=2, slowdown=lambda k: 1.2)
    assert poor.estimate_ms == pytest.approx(1.2 + 0.2)
    assert poor.estimate_ms < sum(costs.values())
    linear = plan_parallel(order, deps, costs, cores=2)
    assert linear.estimate_ms == pytest.approx(2.0 + 0.2)


def test_one_root_is_sequential():
    costs = {"image": 2.0, "head": 1.0}
    order, deps = ["image", "head"], {"image": [], "head": ["image"]}
    schedule = plan_parallel(order, deps, costs, cores=4)
    assert schedule.kind == "sequential"
    assert schedule.workers == [] and schedule.threads == []
    assert schedule.estimate_ms == pytest.approx(3.0) == schedule.bound_ms


def test_one_core_is_sequential():
    costs = {"audio": 1.0, "image": 4.0, "text": 2.0, "fusion": 1.0}
    order, deps = fan_in(costs)
    schedule = plan_parallel(order, deps, costs, cores=1)
    assert schedule.kind == "sequential"
    assert schedule.estimate_ms == pytest.approx(8.0)
    assert schedule.bound_ms == pytest.approx(5.0)


def test_independent_heads_without_fusion():
    costs = {"image.0": 2.0, "image.1": 2.0}
    order, deps = list(costs), {"image.0": [], "image.1": []}
    schedule = plan_parallel(order, deps, costs, cores=2)
    assert schedule.workers == [["image.0"], ["image.1"]]
    assert schedule.estimate_ms == pytest.approx(4.0)
    assert schedule.bound_ms == pytest.approx(2.0)


def test_critical_path():
    order = ["a", "b", "c", "d"]
    deps = {"a": [], "b": ["a"], "c": [], "d": ["b", "c"]}
    assert critical_path_ms(order, deps, {"a": 1.0, "b": 2.0, "c": 5.0, "d": 1.0}) == 6.0
    assert critical_path_ms(order, deps, {"a": 4.0, "b": 2.0, "c": 5.0, "d": 1.0}) == 7.0
    assert critical_path_ms([], {}, {}) == 0.0


def test_schedule_round_trips_through_json():
    schedule = Schedule("parallel", [["image"], ["text", "audio"]], [1, 1], estimate_ms=9.125,
                        bound_ms=5.5, measured_ms={"sequential": 0.25, "parallel": 0.5})
    data = json.loads(json.dumps(schedule.to_dict()))
    assert Schedule.from_dict(data) == schedule
    assert Schedule.from_dict({"kind": "sequential"}) == Schedule("sequential")


def test_to_dict_rounds_times_to_microseconds():
    data = Schedule("sequential", estimate_ms=1.23456789, bound_ms=0.0004).to_dict()
    assert data["estimate_ms"] == 1.235 and data["bound_ms"] == 0.0


def test_check_kind():
    for kind in SCHEDULES:
        assert check_kind(kind) == kind
    with pytest.raises(MMCompileError, match="unknown schedule 'fastest'; expected one of auto"):
        check_kind("fastest")


def test_available_cores():
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def matmul(m, k, n, a_shape=None):
    return make_graph([helper.make_node("MatMul", ["audio", "w"], ["y"])],
                      [("audio", FLOAT, a_shape or [m, k])], [("y", FLOAT, [m, n])],
                      {"w": np.ones((k, n), np.float32)})


def test_estimate_grows_with_the_matmul():
    small, big = estimate_cost_ms(matmul(1, 16, 8)), estimate_cost_ms(matmul(64, 256, 128))
    assert 0 < small < big
    # 2*m*k*n FLOPs at 20 GFLOP/s plus the output's bytes at 10 GB/s
    assert big == pytest.approx(1e3 * (2 * 64 * 256 * 128 / 20e9 + 4 * 64 * 128 / 10e9))


def test_estimate_counts_conv_flops():
    graph = make_graph([helper.make_node("Conv", ["pixel_values", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("pixel_values", FLOAT, [1, 3, 8, 8])], [("y", FLOAT, [1, 4, 8, 8])],
                       {"w": np.ones((4, 3, 3, 3), np.float32)})
    out = 4 * 8 * 8
    assert estimate_cost_ms(graph) == pytest.approx(1e3 * (2 * out * 27 / 20e9 + 4 * out / 10e9))


def test_estimate_with_a_symbolic_inner_dim():
    graph = matmul(1, 16, 5, a_shape=[1, "k"])
    assert estimate_cost_ms(graph) > 0


def test_estimate_of_gemm_with_transposed_a():
    w = {"w": np.ones((64, 5), np.float32)}
    plain = make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])],
                       [("x", FLOAT, [1, 64])], [("y", FLOAT, [1, 5])], w)
    trans = make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)],
                       [("x", FLOAT, [64, 1])], [("y", FLOAT, [1, 5])], w)
    assert estimate_cost_ms(trans) == pytest.approx(estimate_cost_ms(plain))
