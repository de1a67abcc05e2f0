"""Branch moves (mmcompile/planning/moves.py) and the modelled clock (planning/timeline.py):
which branches may move to the accelerator's host, the greedy choice by modelled latency,
the decision recorded in the manifest and the report, a user's placement winning, the
option that turns moves off, and one configured accelerator instance per description."""

from __future__ import annotations

import numpy as np
import pytest
from test_accel_target import load_av_mnist

import mmcompile
from mmcompile.planning import plan
from mmcompile.planning.moves import MARGIN, movable_branches
from mmcompile.planning.placement import place
from mmcompile.planning.timeline import Slot, list_schedule, modelled_latency_ms, replay
from mmcompile.runtime import Stage
from mmcompile.target import get_target


@pytest.fixture(scope="module")
def av_mnist():
    """AV-MNIST: the float graph, its QDQ graph, the calibration samples and one input."""
    return load_av_mnist()


# gemmini-16x16's array at 1 MHz: every layer takes milliseconds of modelled time, so the
# host beats the accelerator on every branch by far more than any timing noise
SLOW = """name = "slow-npu"
rows = 16
cols = 16
dataflow = "os"
clock_mhz = 1
scratchpad_kib = 256
accumulator_kib = 64
dram_gbps = 0.016
dram_latency_cycles = 10
ops = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear"]
"""


def test_replay_overlaps_lanes_and_waits_for_inputs():
    times = replay([Slot("a", "accel lane", 2.0), Slot("h", "caller", 1.0),
                    Slot("b", "caller", 1.0, ("a",)), Slot("c", "accel lane", 1.0, ("h",))])
    assert times == {"a": (0.0, 2.0), "h": (0.0, 1.0), "b": (2.0, 3.0), "c": (2.0, 3.0)}


def test_modelled_latency_puts_modelled_stages_on_their_device_lane():
    def stage(name, modelled=None, deps=()):
        info = {} if modelled is None else {"modelled_ms": modelled}
        return Stage(name, "x", [], [], None, 0.0, info, list(deps),
                     "accel" if modelled is not None else "cpu")
    stages = [stage("text", modelled=2.0), stage("audio"), stage("fusion", deps=("text",
                                                                                  "audio"))]
    costs = {"text": 2.0, "audio": 1.5, "fusion": 0.5}
    assert modelled_latency_ms(stages, costs) == (pytest.approx(2.5), ["text", "audio",
                                                                       "fusion"])
    stages[0].info.clear()  # all on the host: one after another
    assert modelled_latency_ms(stages, costs)[0] == pytest.approx(4.0)


def test_list_scheduling_keeps_both_lanes_busy():
    """Two branches, each accelerator -> host -> accelerator: in the given order (branch by
    branch) nothing overlaps; list scheduling runs one branch's host stage beside the
    other's layers."""
    slots = [Slot("a1", "accel lane", 1.0), Slot("a2", "caller", 1.0, ("a1",)),
             Slot("a3", "accel lane", 1.0, ("a2",)), Slot("b1", "accel lane", 1.0),
             Slot("b2", "caller", 1.0, ("b1",)), Slot("b3", "accel lane", 1.0, ("b2",))]
    assert max(end for _, end in replay(slots).values()) == 6.0
    order = list_schedule(slots)
    assert order[:3] == ["a1", "b1", "a2"]
    by_name = {s.stage: s for s in slots}
    assert max(end for _, end in replay([by_name[n] for n in order]).values()) == 4.0


def test_movable_branches_follow_the_option_and_the_users_placement(av_mnist):
    _, qdq, _, _ = av_mnist
    assert movable_branches(plan(qdq, target="accel")) == {"audio": "cpu", "fusion": "cpu",
                                                           "image": "cpu"}
    assert movable_branches(plan(qdq, target="accel{host=onnxruntime}",
                                 placement={"audio": "accel", "fusion": "cpu"})) == {
        "image": "onnxruntime"}
    assert movable_branches(plan(qdq, target="accel{branch_moves=false}")) == {}
    assert movable_branches(plan(qdq, target="accel", schedule="sequential")) == {}
    assert movable_branches(plan(qdq, target="cpu")) == {}  # the cpu names no host


def test_a_slow_accelerator_loses_its_branches_to_the_host(av_mnist, tmp_path):
    """On a 1 MHz array every branch runs faster on the host: both modality branches move
    (greedy: the better single move first, then the other), the fusion head stays where the
    user placed it; the decision, its figures and every candidate are in the manifest, and
    the moved stages say why they are there."""
    _, qdq, _, feeds = av_mnist
    spec = tmp_path / "slow.toml"
    spec.write_text(SLOW)
    cm = mmcompile.compile(qdq, feeds, target=f"accel{{spec={spec},host=onnxruntime}}",
                           placement={"fusion": "accel"}, tolerance=1e-2)
    moves = cm.metadata["branch_moves"]
    assert moves["moved"] == {"audio": "onnxruntime", "image": "onnxruntime"}
    assert moves["decision"].startswith("branches ") and " moved to onnxruntime: " in \
        moves["decision"]
    tried = {(tuple(sorted(c["moves"])), c["stages"]): c["modelled_ms"]
             for c in moves["candidates"]}
    both = ("audio", "image")
    # as placed, each alone, both; then both cut by target only
    assert list(tried) == [((), "branches"), (("audio",), "branches"),
                           (("image",), "branches"), (both, "branches"), (both, "whole")]
    assert moves["modelled_ms"] == min(tried[both, "branches"], tried[both, "whole"])
    assert moves["as_placed_ms"] == tried[(), "branches"]
    assert moves["modelled_ms"] <= (1 - MARGIN) * moves["as_placed_ms"]
    assert cm.schedule.estimate_ms == pytest.approx(moves["modelled_ms"], abs=1e-4)
    on_accel = {layer["name"] for s in cm.stages if s.target == "accel"
                for layer in s.info["layers"]}
    assert on_accel == {"node_linear", "node_relu_7", "node_linear_1"}  # the fusion head
    reasons = " ".join(s.info["placement"]["reason"] for s in cm.stages)
    assert "audio" in reasons and "image" in reasons and "moved to onnxruntime by the cost " \
        "model" in reasons
    assert "by the cost model" in cm.report()
    assert cm.metadata["verification"].startswith("ok")
    loaded = mmcompile.load(cm.save(tmp_path / "slow.mmc"))
    assert loaded.metadata["branch_moves"]["moved"] == moves["moved"]
    (name,) = cm.output_names
    np.testing.assert_array_equal(loaded.run(feeds)[name], cm.run(feeds)[name])


def test_a_users_placement_and_the_option_keep_branches_on_the_accelerator(av_mnist,
                                                                            tmp_path):
    _, qdq, _, feeds = av_mnist
    spec = tmp_path / "slow.toml"
    spec.write_text(SLOW)
    target = f"accel{{spec={spec},host=onnxruntime}}"
    cm = mmcompile.compile(qdq, feeds, target=target, placement={"audio": "accel"},
                           tolerance=1e-2)
    assert cm.metadata["branch_moves"]["moved"] == {"fusion": "onnxruntime",
                                                    "image": "onnxruntime"}
    cm = mmcompile.compile(qdq, feeds, target=target, target_config={"branch_moves": False},
                           tolerance=1e-2)
    assert "branch_moves" not in cm.metadata
    # 7 convolutions, 2 Gemms and the ReLU between them (no MaxPool in this description)
    assert len([layer for s in cm.stages if s.target == "accel"
                for layer in s.info["layers"]]) == 10


def test_two_descriptions_in_one_process_are_two_configured_instances(av_mnist, tmp_path):
    """Placement asks each configuration's own instance: a description without Gemm keeps
    the head off the accelerator while a preset placed on the fusion branch takes it, and
    the registry's instance is never configured."""
    _, qdq, _, _ = av_mnist
    spec = tmp_path / "no_gemm.toml"
    spec.write_text(SLOW.replace('name = "slow-npu"', 'name = "no-gemm"')
                    .replace('"MatMul", "Gemm", ', ""))
    from mmcompile.planning.branches import assign_branches
    branches = assign_branches(qdq)
    placed = place(qdq, branches, f"accel{{spec={spec}}}",
                   placement={"fusion": "accel{preset=vta-16x16}"})
    primary, fusion = placed.choices[placed.primary], placed.choices["accel{preset=vta-16x16}"]
    assert primary.target is not fusion.target
    assert (primary.target.spec.name, fusion.target.spec.name) == ("no-gemm", "vta-16x16")
    head = [n for n in ("node_linear", "node_linear_1")]
    assert all(placed.nodes[n] == fusion.key for n in head)
    alone = place(qdq, branches, f"accel{{spec={spec}}}")
    assert all(alone.nodes[n] == "cpu" for n in head)
    assert all("Gemm is not among its ops" in alone.fell_back[n] for n in head)
    assert get_target("accel").spec is None
