"""Estimate per-GPU memory and training time of ORPO at a parallel layout, or rank the layouts that fit by time.

    python tools/estimate_memory.py --hf-config CONFIG.json --tp 2 --pp 8 --ep 8 --dp 1 --micro-batch-size 1
    python tools/estimate_memory.py --hf-config CONFIG.json --search [--nodes N | --max-nodes 8] --max-length 2048

The flags, the report and the search are `orpo_megatron/planning/estimator.py`'s (`--help` lists the flags).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orpo_megatron.planning.estimator import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
