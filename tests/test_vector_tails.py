"""Guarded vector loops get a whole-vector branch (targets/tvm/vector_tails.py), and register
tiles' write-backs are unrolled (cpu_matmul.unroll_write_back): same numbers, vector code."""

from __future__ import annotations

import re

import numpy as np
import pytest

SCALE = 0.065


def _scores_func(batch: int, keys: int, depth: int, quantize: bool):
    """Attention scores ``q @ k`` over ``keys`` keys, then (``quantize``) the quantize /
    dequantize pair of a QDQ graph and a scale, as CLIP's int8 build fuses them."""
    from tvm import te
    q = te.placeholder((batch, keys, depth), name="q")
    k = te.placeholder((batch, depth, keys), name="k")
    r = te.reduce_axis((0, depth), "r")
    s = te.compute((batch, keys, keys), lambda b, i, j: te.sum(q[b, i, r] * k[b, r, j], axis=r),
                   name="s")
    if not quantize:
        out = te.compute(s.shape, lambda *i: s(*i) * 0.125, name="out")
        return te.create_prim_func([q, k, out])
    u8 = te.compute(s.shape, lambda *i: te.max(te.min(te.round(s(*i) / SCALE) + 129.0, 255.0),
                                               0.0).astype("uint8"), name="quantize")
    dq = te.compute(s.shape, lambda *i: (u8(*i).astype("int32") - 129).astype("float32")
                    * SCALE, name="dequantize")
    out = te.compute(s.shape, lambda *i: dq(*i) * 0.125, name="out")
    return te.create_prim_func([q, k, out])


def _reference(q, k, quantize):
    s = (q.astype("float64") @ k).astype("float32")
    if quantize:
        s = (np.clip(np.round(s / np.float32(SCALE)) + 129, 0, 255) - 129) * np.float32(SCALE)
    return s * 0.125


def _build(func, mcpu="haswell"):
    import tvm
    return tvm.compile(func.with_attr("global_symbol", "main"),
                       target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))


def _run(lib, arrays):
    import tvm
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _guarded_vector_loops(func) -> tuple[int, int]:
    """(vector loops whose block has a predicate, if / else splits) in ``func``."""
    import tvm_ffi
    from tvm import s_tir, tirx
    counts = [0, 0]

    def on_for(loop, visitor):
        if loop.kind == tirx.ForKind.VECTORIZED and isinstance(loop.body, s_tir.SBlockRealize) \
                and not isinstance(loop.body.predicate, tirx.IntImm):
            counts[0] += 1
        visitor.default_visit(loop)

    def on_if(node, visitor):
        if isinstance(node.then_case, tirx.For) \
                and node.then_case.kind == tirx.ForKind.VECTORIZED:
            counts[1] += 1
        visitor.default_visit(node)
    tvm_ffi.structural_visit(func.body, [(tirx.For, on_for), (tirx.IfThenElse, on_if)])
    return counts[0], counts[1]


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("keys", [65, 20])
def test_padded_write_back_gets_a_whole_vector_branch_with_the_same_numbers(quantize, keys):
    """65 keys pad to 72 columns: the write-back's predicate reads the vector lane. Split,
    the vectors inside the 65 columns run unpredicated; outputs are bit-identical to the
    unsplit kernel and match numpy (the quantize's rounding exactly, sums to 1e-5)."""
    import tvm

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    from mmcompile.targets.tvm.vector_tails import split_guarded_vectors
    sch = BlockedMatmul._schedule(_scores_func(2, keys, 32, quantize), lanes=8)
    assert sch is not None
    before = sch.mod["main"]
    after = split_guarded_vectors(tvm.IRModule({"main": before}))["main"]
    guarded, _ = _guarded_vector_loops(before)
    assert guarded >= 1
    assert _guarded_vector_loops(after) == (0, guarded)  # every guarded loop split
    verify_ssa = tvm.get_global_func("tirx.transform.VerifySSA")()
    assert verify_ssa(tvm.IRModule({"main": after}))  # each variable defined once
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, keys, 32)).astype("float32")
    k = rng.standard_normal((2, 32, keys)).astype("float32")
    arrays = [q, k, np.zeros((2, keys, keys), "float32")]
    plain, split = _run(_build(before), arrays), _run(_build(after), arrays)
    assert np.array_equal(plain, split)
    expected = _reference(q, k, quantize)
    if quantize:  # a sum within rounding of a half step may round the other way: one step
        assert np.mean(np.abs(split - expected) > 1e-4) < 1e-3
        assert np.abs(split - expected).max() <= SCALE * 0.125 * 1.001
    else:
        np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-5)


def _vector_loop_func(predicate: str, folder):
    """Three vectors of 8 lanes, each lane written where ``predicate`` holds. TVMScript
    parses functions from files only: written to ``folder`` and imported."""
    import importlib.util
    path = folder / "vector_loop.py"
    path.write_text(f'''from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def main(a: T.Buffer((24,), "float32"), b: T.Buffer((24,), "float32")):
    for i in range(3):
        for j in T.vectorized(8):
            with T.sblock("b"):
                v = T.axis.spatial(24, i * 8 + j)
                T.where({predicate})
                b[v] = a[v] / T.float32(3.0)
''')
    spec = importlib.util.spec_from_file_location("vector_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("predicate, split", [
    ("i * 8 + j < 21", True),        # linear in the lane: checked at both ends
    ("i < 2 and i * 8 + j < 21", True),
    ("(i * 8 + j) % 5 < 3", False),  # not monotone in the lane: left alone
])
def test_only_predicates_linear_in_the_lane_are_split(predicate, split, tmp_path):
    import tvm

    from mmcompile.targets.tvm.vector_tails import split_guarded_vectors
    func = _vector_loop_func(predicate, tmp_path)
    after = split_guarded_vectors(tvm.IRModule({"main": func}))["main"]
    assert _guarded_vector_loops(after) == ((0, 1) if split else (1, 0))
    a = np.arange(24, dtype="float32")
    out = _run(_build(after), [a, np.full(24, -1, "float32")])
    mask = np.array([eval(predicate, {}, {"i": n // 8, "j": n % 8}) for n in range(24)])
    np.testing.assert_array_equal(out[mask], a[mask] / np.float32(3.0))
    assert (out[~mask] == -1).all()  # the guarded lanes are not written


def test_register_tile_write_back_is_unrolled_and_the_tile_stays_in_registers():
    """A write-back LLVM does not unroll (the quantize epilogue is long) indexed the tile with
    a variable: the whole tile lived on the stack, two memory accesses per FMA (132
    stack-relative ymm accesses in this kernel, against 1 for the unrolled write-back)."""
    from tvm import tirx

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_scores_func(2, 65, 32, True), lanes=8)
    write_back = sch.get_sblock("s_pad_global")  # the padded tile, epilogue folded in
    kinds = [sch.get(loop).kind for loop in sch.get_loops(write_back)]
    assert tirx.ForKind.SERIAL not in kinds[1:]  # under the parallel tile loop
    asm = _build(sch.mod["main"]).mod.inspect_source("asm")
    stack_vectors = re.findall(r"ymm\d+, -?(?:0x)?[0-9a-f]*\(%rsp\)|\(%rsp\), %ymm", asm)
    assert len(stack_vectors) < 8, len(stack_vectors)

