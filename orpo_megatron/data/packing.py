"""Which pairs share a row when a step's pairs are packed into rows of one fixed length (pipelining).

Pipeline stages exchange activations of one shape per schedule call, so with pipelining every micro-batch of a
step is one row of the same length. The step's pairs (all data-parallel ranks together, so no rank waits on a
rank with more rows) are bin-packed whole into the fewest rows that the rules allow:
- the number of rows is a multiple of `rows_multiple` (the DP size, times PP for the interleaved schedule), so
  every rank gets the same number of micro-batches, and every row holds at least one pair;
- pairs are placed longest first, each into the emptiest row (worst-fit decreasing), starting from the lower
  bound ceil(tokens / row_length) rounded up to the multiple and adding `rows_multiple` rows until all fit.
  Filling the emptiest row first keeps the rows' loads even, and since the row count is fixed before placing,
  the real-token fraction is that of any packing with that many rows.
"""
from __future__ import annotations

import heapq
import math


def pack_rows(lengths: list[int], row_length: int, rows_multiple: int = 1) -> list[list[int]]:
    """Indices into `lengths` (tokens per pair) of the pairs in each row, each row's indices ascending."""
    if not lengths:
        raise ValueError("no pairs to pack")
    longest = max(lengths)
    if longest > row_length:
        raise ValueError(f"a pair of {longest} tokens does not fit in a row of {row_length} (--packed-length)")
    rows = math.ceil(math.ceil(sum(lengths) / row_length) / rows_multiple) * rows_multiple
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    while rows <= len(lengths):
        packing = _worst_fit(order, lengths, row_length, rows)
        if packing is not None:
            return [sorted(row) for row in packing]
        rows += rows_multiple
    raise ValueError(f"{len(lengths)} pairs cannot fill a multiple of {rows_multiple} rows with at least one pair "
                     "each; raise --global-batch-size")


def _worst_fit(order: list[int], lengths: list[int], row_length: int, rows: int) -> list[list[int]] | None:
    filled = [(0, row) for row in range(rows)]  # (tokens, row): a heap, emptiest first
    packing: list[list[int]] = [[] for _ in range(rows)]
    for index in order:
        tokens, row = heapq.heappop(filled)
        if tokens + lengths[index] > row_length:
            return None
        packing[row].append(index)
        heapq.heappush(filled, (tokens + lengths[index], row))
    return packing
