"""How a GEMM tile runs on a systolic array: folds, cycles and SRAM accesses per dataflow.

A GEMM ``(M, K) x (K, N)`` is mapped onto an ``R x C`` array the way SCALE-Sim maps it
(``scalesim/compute/systolic_compute_{ws,os,is}.py``), and costed the way it counts:

============  ===============  =====================  ======================================
dataflow      array rows/cols  streamed (T)           cycles per fold
============  ===============  =====================  ======================================
``ws``        K / N            M input rows           R (weights shift in) + T + (R-1) +
                                                      (C-1) (skew to fill and drain)
``os``        M / N            K reduction steps      T + (R-1) + (C-1)
``is``        K / M            N weight columns       R + T + (R-1) + (C-1)
============  ===============  =====================  ======================================

A fold is one placement of a ``R x C`` block of the stationary operand; a dimension that
does not divide the array leaves PEs idle in its last fold (``ceil``). SCALE-Sim 3's
"Total Cycles" for a layer without memory stalls is the sum over folds minus one; this
module does not subtract the one (it is SCALE-Sim's trace indexing, not a cycle of work).
The counts of SRAM accesses per tile feed the energy model; their derivation is in
:func:`sram_accesses`.
"""

from __future__ import annotations

from math import ceil


def mapping(dataflow: str, m: int, k: int, n: int) -> tuple[int, int, int]:
    """``(dimension on the rows, dimension on the columns, streamed dimension)``."""
    if dataflow == "ws":
        return k, n, m
    if dataflow == "os":
        return m, n, k
    if dataflow == "is":
        return k, m, n
    raise ValueError(f"unknown dataflow {dataflow!r}")


def folds(dataflow: str, rows: int, cols: int, m: int, k: int, n: int) -> int:
    """Placements of the stationary operand a ``(m, k, n)`` GEMM needs."""
    on_rows, on_cols, _ = mapping(dataflow, m, k, n)
    return ceil(on_rows / rows) * ceil(on_cols / cols)


def fold_cycles(dataflow: str, rows: int, cols: int, streamed: int) -> int:
    """Cycles of one fold that streams ``streamed`` vectors (the table above)."""
    skew = rows + cols - 2
    preload = 0 if dataflow == "os" else rows
    return preload + streamed + skew


def gemm_cycles(dataflow: str, rows: int, cols: int, m: int, k: int, n: int) -> int:
    """Array cycles of a ``(m, k, n)`` GEMM, fill and drain of every fold included."""
    _, _, streamed = mapping(dataflow, m, k, n)
    return folds(dataflow, rows, cols, m, k, n) * fold_cycles(dataflow, rows, cols, streamed)


def sram_accesses(dataflow: str, rows: int, cols: int, m: int, k: int,
                  n: int) -> dict[str, int]:
    """Elements read from the scratchpad (``inp``, ``wgt``) and accumulator words read and
    written (``acc``) by one ``(m, k, n)`` GEMM.

    The stationary operand is read once; the streamed one once per fold of the array
    dimension it does not occupy; partial sums leave the array once per fold of the
    reduction when K is on the rows (``ws``, ``is``: read, add, write back), once per tile
    when they stay in the PEs (``os``).
    """
    k_folds, n_folds = ceil(k / rows), ceil(n / cols)
    if dataflow == "ws":
        return {"inp": m * k * n_folds, "wgt": k * n, "acc": 2 * m * n * k_folds}
    if dataflow == "os":
        return {"inp": m * k * n_folds, "wgt": k * n * ceil(m / rows), "acc": 2 * m * n}
    m_folds = ceil(m / cols)
    return {"inp": m * k, "wgt": k * n * m_folds, "acc": 2 * m * n * k_folds}
