"""Which pairs share a row when a step's pairs are packed into rows of one fixed length (pipelining).

Pipeline stages exchange activations of one shape per schedule call, so with pipelining every micro-batch of a
step is one row of the same length. The step's pairs (all data-parallel ranks together, so every rank computes
the same number of rows) are bin-packed whole, first-fit decreasing: longest pair first, each into the first row
with room. The number of rows is then rounded up to a multiple of `rows_multiple` (the DP size, times PP for the
interleaved schedule) by moving the shortest pair of the fullest-populated rows into new rows, so no row is empty.
Every row costs the same fixed length, so the real-token fraction is tokens / (rows x length).
"""
from __future__ import annotations

import math

from orpo_megatron.errors import ConfigError


def pack_rows(lengths: list[int], row_length: int, rows_multiple: int = 1) -> list[list[int]]:
    """Indices into `lengths` (tokens per pair) of the pairs in each row, each row's indices ascending."""
    if not lengths:
        raise ValueError("no pairs to pack")
    longest = max(lengths)
    if longest > row_length:
        raise ConfigError(f"a pair of {longest} tokens does not fit in a row of {row_length} (--packed-length)")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(row_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    wanted = math.ceil(len(rows) / rows_multiple) * rows_multiple
    if wanted > len(lengths):
        raise ConfigError(f"{len(lengths)} pairs cannot fill a multiple of {rows_multiple} rows with at least one "
                         "pair each; raise --global-batch-size")
    while len(rows) < wanted:
        donor = max(rows, key=len)  # holds >= 2 pairs: fewer rows than pairs remain
        rows.append([donor.pop()])  # its shortest pair (placed last)
    return [sorted(row) for row in rows]
