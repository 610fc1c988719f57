"""Read a local (e.g. offline) W&B run back: its history rows, summary and config, without a W&B account.

    python tools/read_wandb.py RUN_DIR [--summary | --config]

RUN_DIR is a run folder (`offline-run-<time>-<id>` / `run-<time>-<id>`, holding `run-<id>.wandb`) or a W&B save
folder (`wandb/` or its parent), where the newest run is read. Prints one JSON object per history row, or the
summary / config as one JSON object.

The `.wandb` file is W&B's transaction log: a 7-byte header (`:W&B`, version) and then LevelDB-log framing
(32 KiB blocks; each chunk has a 7-byte header: crc32 (4), length (2), type (1) = full/first/middle/last), each
assembled payload a `wandb_internal_pb2.Record`. Only the protobuf schema comes from the wandb package.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orpo_megatron.errors import UserError  # noqa: E402

BLOCK_SIZE = 32768
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, payload length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbRunError(UserError, ValueError):
    """A folder without a readable W&B run, with the path named."""


def find_run_file(run_dir: str) -> str:
    """The `.wandb` file of `run_dir`, or of the newest run under it (a `wandb/` save folder or its parent)."""
    direct = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if direct:
        return max(direct, key=os.path.getmtime)
    nested = (glob.glob(os.path.join(run_dir, "*run-*", "run-*.wandb"))
              + glob.glob(os.path.join(run_dir, "wandb", "*run-*", "run-*.wandb")))
    if not nested:
        raise WandbRunError(f"{run_dir}: no W&B run found (expected run-<id>.wandb in it, or in a "
                            "[wandb/]offline-run-*/ or run-*/ folder below it)")
    return max(nested, key=os.path.getmtime)


def _payloads(data: bytes, path: str) -> Iterator[bytes]:
    """Reassemble the LevelDB-log chunks after the header into record payloads."""
    position, pending = 7, b""
    while position + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding up to the end of a block
            position += left_in_block
            continue
        start = position + CHUNK_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length:  # a run still being written ends mid-chunk
            return
        position = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise WandbRunError(f"{path}: unknown chunk type {kind} at byte {position - length}")


def records(path: str) -> Iterator[Any]:
    """Every `Record` protobuf of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise WandbRunError(f"{path}: not a W&B transaction log (header {data[:4]!r}, expected b':W&B')")
    for payload in _payloads(data, path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """The run's history rows (one per `wandb.log` call), with W&B's `_step`, `_runtime`, `_timestamp`."""
    path = find_run_file(run_dir)
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def read_summary(run_dir: str) -> dict[str, Any]:
    """The run's summary: the last summary update of every key."""
    summary: dict[str, Any] = {}
    for r in records(find_run_file(run_dir)):
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    return summary


def read_config(run_dir: str) -> dict[str, Any]:
    """The run's config (W&B stores each key as {"value": ...}; the values are returned)."""
    config: dict[str, Any] = {}
    for r in records(find_run_file(run_dir)):
        if r.WhichOneof("record_type") == "config":
            for key, value in _items(r.config.update).items():
                config[key] = value["value"] if isinstance(value, dict) and "value" in value else value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="A W&B run folder, or a save folder holding runs (the newest is read).")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--summary", action="store_true", help="Print the run's summary instead of its history.")
    what.add_argument("--config", action="store_true", help="Print the run's config instead of its history.")
    args = parser.parse_args(argv)
    try:
        if args.summary:
            print(json.dumps(read_summary(args.run_dir)))
        elif args.config:
            print(json.dumps(read_config(args.run_dir)))
        else:
            for row in read_history(args.run_dir):
                print(json.dumps(row))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
