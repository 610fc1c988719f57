"""Worker: the timeout of every process group after `parallel.initialize` with a configured timeout.

Writes {group name: timeout in minutes} for the world group and every process group Megatron-Core's parallel
state holds (module globals that are process groups, or lists of them), read from each group's backend.
"""
import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from orpo_megatron import parallel
from orpo_megatron.model_config import HFModelConfig


def timeout_minutes(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--timeout-minutes", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel.initialize(dict(expert_model_parallel_size=2), HFModelConfig.from_file(args.hf_dir),
                        timeout_minutes=args.timeout_minutes)
    found = {"world": timeout_minutes(dist.group.WORLD)}
    for name, value in vars(parallel_state).items():
        groups = value if isinstance(value, list) else [value]
        for i, group in enumerate(groups):
            if isinstance(group, dist.ProcessGroup):
                found[f"{name}[{i}]" if isinstance(value, list) else name] = timeout_minutes(group)
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(found, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
