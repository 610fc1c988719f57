"""Preference data for ORPO: sources, tokenizer and chat templates, tokenized pairs, micro-batches.

The trainer needs two names: `add_data_args(parser)` and `build_preference_data(...)`.
"""
from orpo_megatron.data.arguments import add_data_args
from orpo_megatron.data.pipeline import build_preference_data

__all__ = ["add_data_args", "build_preference_data"]
