"""The pass registry, pipeline resolution, the pass manager, instruments and ``optimize``."""

import json

import numpy as np
import onnx
import pytest
from helpers import FLOAT, make_graph
from onnx import helper

import mmcompile
from mmcompile.errors import PassError, PipelineError, RegistryError, VerificationError
from mmcompile.transform import (CallbackInstrument, Instrument, IRDumpInstrument, Pass,
                                 PassContext, PassManager, PassResult, TimingInstrument, get_pass,
                                 register_pass, resolve_pipeline)
from mmcompile.transform.pass_base import _REGISTRY


def _make_pass(name, *, requires=(), opt_level=1, options=None, run=None):
    """A Pass subclass whose ``calls`` list records the config of every invocation."""
    calls = []

    def _run(self, graph, ctx):
        calls.append(dict(self.config))
        return run(self, graph, ctx, len(calls)) if run else PassResult(False)

    return type(f"Test_{name}", (Pass,), {"name": name, "requires": tuple(requires),
                                           "opt_level": opt_level, "options": options or {},
                                           "run": _run, "calls": calls})


@pytest.fixture
def add_pass():
    """Register test-only passes; their registry entries are removed after the test."""
    added = []

    def add(name, **kwargs):
        cls = register_pass(_make_pass(name, **kwargs))
        added.append(name)
        return cls

    yield add
    for name in added:
        _REGISTRY.pop(name, None)


def _chain():
    """a -> Neg -> b -> Neg -> c."""
    nodes = [helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Neg", ["b"], ["c"])]
    return make_graph(nodes, [("a", FLOAT, [2, 3])], [("c", FLOAT, [2, 3])])


def _foldable():
    """y = x * (w + w): the Add is a constant subgraph fold-constants removes."""
    nodes = [helper.make_node("Add", ["w", "w"], ["w2"]),
             helper.make_node("Mul", ["x", "w2"], ["y"])]
    return make_graph(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                      {"w": np.ones((2, 3), np.float32)})


def _changing(first_n):
    """A run() that reports a change on its first ``first_n`` calls."""
    return lambda self, graph, ctx, n: PassResult(changed=n <= first_n, stats={"n": n})


# -- registry -----------------------------------------------------------------------------------

def test_duplicate_pass_name_raises_registry_error(add_pass):
    first = add_pass("test-pm-dup")
    register_pass(first)  # registering the same class again is harmless
    second = _make_pass("test-pm-dup")
    with pytest.raises(RegistryError, match="registered twice") as info:
        register_pass(second)
    assert first.__qualname__ in str(info.value) and "test-pm-dup" in str(info.value)
    assert get_pass("test-pm-dup") is first


def test_pass_without_name_cannot_be_registered():
    with pytest.raises(RegistryError, match="has no name"):
        register_pass(_make_pass(""))
    assert "" not in _REGISTRY


def test_builtin_passes_are_registered():
    names = mmcompile.registered_passes()
    assert {"fold-constants", "eliminate-dead-code"} <= set(names)
    assert list(names) == sorted(names)


# -- resolution: names, options, requirements ---------------------------------------------------

def test_unknown_pass_fails_before_any_pass_runs(add_pass):
    counter = add_pass("test-pm-count")
    with pytest.raises(PipelineError, match="unknown pass 'no-such-pass'") as info:
        mmcompile.optimize(_chain(), "test-pm-count,no-such-pass")
    assert "fold-constants" in str(info.value)  # lists the known passes
    assert counter.calls == []


def test_unknown_option_fails_before_any_pass_runs(add_pass):
    counter = add_pass("test-pm-count")
    with pytest.raises(PipelineError, match=r"no option\(s\) \['bogus'\]") as info:
        mmcompile.optimize(_chain(), "test-pm-count,fold-constants{bogus=1}")
    assert "size_threshold" in str(info.value)
    assert counter.calls == []


def test_options_are_coerced_to_the_default_type(add_pass):
    opts = add_pass("test-pm-opts", options={"limit": 3, "flag": False, "label": "x"})
    mmcompile.optimize(_chain(), "test-pm-opts{limit=7,flag=yes,label=hello},test-pm-opts")
    assert opts.calls == [{"limit": 7, "flag": True, "label": "hello"},
                          {"limit": 3, "flag": False, "label": "x"}]
    assert get_pass("fold-constants")(size_threshold="1024").config["size_threshold"] == 1024
    assert get_pass("fold-constants")(fold_shapes="off").config["fold_shapes"] is False


@pytest.mark.parametrize("option, expected", [("limit=abc", "int"), ("flag=maybe", "bool"),
                                              ("limit=1.5", "int")])
def test_bad_option_value_raises_pipeline_error(add_pass, option, expected):
    add_pass("test-pm-opts", options={"limit": 3, "flag": False})
    key = option.split("=")[0]
    with pytest.raises(PipelineError, match=f"option '{key}' of pass 'test-pm-opts' expects "
                                            f"{expected}"):
        PassManager(f"test-pm-opts{{{option}}}")


def test_requires_inserts_missing_pass_before_the_requiring_one(add_pass):
    a = add_pass("test-pm-a")
    add_pass("test-pm-b", requires=["test-pm-a"])
    add_pass("test-pm-c", requires=["test-pm-b"])
    assert str(resolve_pipeline("test-pm-b")) == "test-pm-a,test-pm-b"
    assert str(resolve_pipeline("test-pm-c")) == "test-pm-a,test-pm-b,test-pm-c"
    assert str(resolve_pipeline("test-pm-a,test-pm-b")) == "test-pm-a,test-pm-b"
    assert str(resolve_pipeline("fixpoint(test-pm-b)")) == "fixpoint(test-pm-a,test-pm-b)"
    records = mmcompile.optimize(_chain(), "test-pm-b").records
    assert [r.name for r in records] == ["test-pm-a", "test-pm-b"]
    assert len(a.calls) == 1


def test_requirement_cycle_raises_pipeline_error_naming_the_cycle(add_pass):
    counter = add_pass("test-pm-count")
    add_pass("test-pm-c", requires=["test-pm-d"])
    add_pass("test-pm-d", requires=["test-pm-c"])
    with pytest.raises(PipelineError, match="cycle of requirements") as info:
        mmcompile.optimize(_chain(), "test-pm-count,test-pm-c")
    message = str(info.value)
    assert "test-pm-c -> test-pm-d -> test-pm-c" in message or \
        "test-pm-d -> test-pm-c -> test-pm-d" in message
    assert counter.calls == []


# -- running: skipping, fixed points ------------------------------------------------------------

def test_disabled_pass_is_skipped_and_recorded(add_pass):
    skipped = add_pass("test-pm-skip")
    ran = add_pass("test-pm-run")
    ctx = PassContext(disabled_passes={"test-pm-skip"})
    records = mmcompile.optimize(_chain(), "test-pm-skip,test-pm-run", ctx=ctx).records
    assert [(r.name, r.skipped) for r in records] == [("test-pm-skip", "disabled"),
                                                      ("test-pm-run", None)]
    assert skipped.calls == [] and len(ran.calls) == 1


def test_opt_level_skips_passes_above_it(add_pass):
    heavy = add_pass("test-pm-heavy", opt_level=2)
    records = mmcompile.optimize(_chain(), "test-pm-heavy", ctx=PassContext(opt_level=1)).records
    assert records[0].skipped == "opt_level 2 > 1" and not records[0].changed
    assert heavy.calls == []
    mmcompile.optimize(_chain(), "test-pm-heavy", ctx=PassContext(opt_level=2))
    assert len(heavy.calls) == 1


def test_fixpoint_repeats_until_a_round_changes_nothing(add_pass):
    twice = add_pass("test-pm-twice", run=_changing(2))
    never = add_pass("test-pm-never")
    records = mmcompile.optimize(_chain(), "fixpoint(test-pm-twice,test-pm-never)").records
    assert [(r.name, r.round, r.changed) for r in records] == [
        ("test-pm-twice", 1, True), ("test-pm-never", 1, False),
        ("test-pm-twice", 2, True), ("test-pm-never", 2, False),
        ("test-pm-twice", 3, False), ("test-pm-never", 3, False)]
    assert len(twice.calls) == 3 and len(never.calls) == 3


def test_fixpoint_respects_max_iterations(add_pass):
    always = add_pass("test-pm-always", run=_changing(10**6))
    records = mmcompile.optimize(_chain(), "fixpoint(test-pm-always){max_iterations=4}").records
    assert [r.round for r in records] == [1, 2, 3, 4]
    assert len(always.calls) == 4


def test_records_outside_fixpoint_have_no_round_and_count_nodes(add_pass):
    result = mmcompile.optimize(_foldable(), "fold-constants")
    (record,) = result.records
    assert record.round is None and record.changed
    assert (record.nodes_before, record.nodes_after) == (2, 1)
    assert record.stats == {"nodes_folded": 1}


# -- failures -----------------------------------------------------------------------------------

def _raise_at_node(self, graph, ctx, n):
    exc = ValueError("kaboom")
    exc.node = "Neg_2"
    raise exc


def test_exception_in_pass_becomes_pass_error_naming_pass_previous_and_node(add_pass):
    add_pass("test-pm-a")
    add_pass("test-pm-b")
    add_pass("test-pm-raise", run=_raise_at_node)
    with pytest.raises(PassError) as info:
        mmcompile.optimize(_chain(), "test-pm-a,test-pm-b,test-pm-raise")
    err = info.value
    assert str(err) == ("error in pass 'test-pm-raise' at node 'Neg_2' (after passes "
                        "[test-pm-a, test-pm-b]): ValueError: kaboom")
    assert (err.pass_name, err.previous, err.node) == ("test-pm-raise", ("test-pm-a", "test-pm-b"),
                                                       "Neg_2")
    assert isinstance(err.__cause__, ValueError)


def test_first_pass_failure_says_no_passes_ran_before(add_pass):
    def fail(self, graph, ctx, n):
        raise RuntimeError("no node here")

    add_pass("test-pm-fail", run=fail)
    with pytest.raises(PassError, match=r"^error in pass 'test-pm-fail' \(after passes \[none\]\): "
                                        r"RuntimeError: no node here$") as info:
        mmcompile.optimize(_chain(), "test-pm-fail")
    assert info.value.node is None


def test_mmcompile_error_in_pass_keeps_its_node(add_pass):
    def fail(self, graph, ctx, n):
        raise VerificationError("bad weights", node="Neg_1")

    add_pass("test-pm-fail", run=fail)
    with pytest.raises(PassError, match="at node 'Neg_1'.*bad weights") as info:
        mmcompile.optimize(_chain(), "test-pm-fail")
    assert info.value.node == "Neg_1"


@pytest.mark.parametrize("value", [True, None, {"changed": True}])
def test_pass_returning_non_pass_result_is_an_error(add_pass, value):
    add_pass("test-pm-bad-result", run=lambda self, graph, ctx, n: value)
    with pytest.raises(PassError, match=f"returned {type(value).__name__}, expected PassResult"):
        mmcompile.optimize(_chain(), "test-pm-bad-result")


def _delete_first_producer(self, graph, ctx, n):
    node = graph.gs.nodes[0]
    node.outputs.clear()  # its consumer now reads a tensor nothing produces
    graph.gs.nodes.remove(node)
    return PassResult(True)


def test_verify_each_catches_a_pass_that_breaks_the_graph(add_pass):
    add_pass("test-pm-ok")
    add_pass("test-pm-breaker", run=_delete_first_producer)
    # Without verification the broken graph goes through unnoticed...
    mmcompile.optimize(_chain(), "test-pm-ok,test-pm-breaker")
    # ... with it, the pass that broke it is named, with the node that reads the lost tensor.
    with pytest.raises(PassError, match="produced an invalid graph") as info:
        mmcompile.optimize(_chain(), "test-pm-ok,test-pm-breaker",
                           ctx=PassContext(verify_each=True))
    err = info.value
    assert err.pass_name == "test-pm-breaker" and err.previous == ("test-pm-ok",)
    assert err.node == "Neg_2"
    assert "'b'" in str(err)


def test_verify_each_accepts_passes_that_keep_the_graph_valid():
    result = mmcompile.optimize(_foldable(), "fold-constants,eliminate-dead-code",
                                ctx=PassContext(verify_each=True))
    assert result.nodes_after == 1


# -- instruments --------------------------------------------------------------------------------

def test_timing_instrument_counts_calls_per_pass(add_pass):
    add_pass("test-pm-always", run=_changing(10**6))
    add_pass("test-pm-skip")
    timing = TimingInstrument()
    ctx = PassContext(instruments=[timing], disabled_passes={"test-pm-skip"})
    mmcompile.optimize(_chain(), "test-pm-skip,fixpoint(test-pm-always){max_iterations=3}", ctx=ctx)
    assert dict(timing.calls) == {"test-pm-always": 3}
    assert timing.seconds["test-pm-always"] >= 0
    table = timing.render()
    assert "test-pm-always" in table and "calls" in table


def test_ir_dump_instrument_writes_only_changed_passes(add_pass, tmp_path):
    add_pass("test-pm-change", run=_changing(10**6))
    add_pass("test-pm-same")
    out = tmp_path / "dumps" / "nested"
    ctx = PassContext(instruments=[IRDumpInstrument(out)])
    mmcompile.optimize(_chain(), "test-pm-change,test-pm-same,test-pm-change", ctx=ctx)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["001-test-pm-change.onnx", "002-test-pm-change.onnx"]
    onnx.checker.check_model(onnx.load(out / files[0]))


def test_ir_dump_of_a_real_pass_holds_the_graph_after_it(tmp_path):
    ctx = PassContext(instruments=[IRDumpInstrument(tmp_path)])
    mmcompile.optimize(_foldable(), "fold-constants,eliminate-dead-code", ctx=ctx)
    assert [p.name for p in tmp_path.iterdir()] == ["001-fold-constants.onnx"]
    model = onnx.load(tmp_path / "001-fold-constants.onnx")
    assert [n.op_type for n in model.graph.node] == ["Mul"]


def test_callback_instrument_sees_before_and_after_in_order(add_pass):
    add_pass("test-pm-a", run=_changing(1))
    add_pass("test-pm-skip")
    add_pass("test-pm-b")
    events = []
    ctx = PassContext(instruments=[CallbackInstrument(lambda *e: events.append(e))],
                      disabled_passes={"test-pm-skip"})
    mmcompile.optimize(_chain(), "test-pm-a,test-pm-skip,test-pm-b", ctx=ctx)
    assert [(e, name) for e, name, _ in events] == [("before", "test-pm-a"), ("after", "test-pm-a"),
                                                    ("before", "test-pm-b"), ("after", "test-pm-b")]
    assert events[0][2] is None
    assert events[1][2] == PassResult(True, {"n": 1})
    assert events[3][2] == PassResult(False)


def test_instrument_exit_runs_even_when_a_pass_fails(add_pass):
    add_pass("test-pm-raise", run=_raise_at_node)
    seen = []

    class Recorder(Instrument):
        def enter(self, ctx):
            seen.append("enter")

        def before_pass(self, graph, pass_):
            seen.append("before")

        def after_pass(self, graph, pass_, result):
            seen.append("after")

        def exit(self, ctx):
            seen.append("exit")

    with pytest.raises(PassError):
        mmcompile.optimize(_chain(), "test-pm-raise", ctx=PassContext(instruments=[Recorder()]))
    assert seen == ["enter", "before", "exit"]


# -- optimize() ---------------------------------------------------------------------------------

def test_optimize_leaves_the_input_graph_unmodified():
    graph = _foldable()
    nodes = list(graph.gs.nodes)
    result = mmcompile.optimize(graph, "fold-constants")
    assert result.graph is not graph
    assert graph.gs.nodes == nodes and graph.op_counts() == {"Add": 1, "Mul": 1}
    assert result.graph.op_counts() == {"Mul": 1}
    assert (result.nodes_before, result.nodes_after) == (2, 1)


def test_optimize_inplace_edits_the_given_graph():
    graph = _foldable()
    result = mmcompile.optimize(graph, "fold-constants", inplace=True)
    assert result.graph is graph
    assert graph.op_counts() == {"Mul": 1}


def test_optimize_keeps_modalities_and_name_on_the_copy():
    graph = _foldable()
    graph.modalities["x"] = mmcompile.ModalityTag("tabular", "explicit mapping")
    result = mmcompile.optimize(graph, "fold-constants")
    assert result.graph.modalities == graph.modalities
    assert result.graph.name == graph.name


def test_optimize_report_has_both_tables_and_to_dict_is_json():
    result = mmcompile.optimize(_foldable(), "fixpoint(fold-constants,eliminate-dead-code)")
    report = result.report()
    assert "pipeline: fixpoint(fold-constants,eliminate-dead-code)" in report
    assert "counters" in report and "nodes_folded=1" in report  # pass table
    assert "before" in report and "TOTAL" in report and "Add" in report  # op table
    data = json.loads(json.dumps(result.to_dict()))
    assert data["nodes_before"] == 2 and data["nodes_after"] == 1
    assert data["ops_before"] == {"Add": 1, "Mul": 1} and data["ops_after"] == {"Mul": 1}
    assert [(p["name"], p["round"]) for p in data["passes"]] == [
        ("fold-constants", 1), ("eliminate-dead-code", 1),
        ("fold-constants", 2), ("eliminate-dead-code", 2)]


def test_optimize_with_empty_pipeline_changes_nothing():
    result = mmcompile.optimize(_foldable(), "none")
    assert result.records == [] and result.ops_after == result.ops_before
