"""This rank's model: its TransformerConfig, padded vocabulary and model chunks at a parallel layout, optionally
with the router frozen, in Megatron's DDP, and with a checkpoint's weights.

The trainer, the evaluator, the conversion check, the GPU acceptance harness and the tests build their model here,
after `parallel.initialize` (the trainer checks its data in between).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer import TransformerConfig

from orpo_megatron import model, optimizer as optimizers
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig, build_transformer_config
from orpo_megatron.parallel import ParallelLayout


@dataclasses.dataclass
class RankModel:
    config: TransformerConfig
    vocab: model.VocabInfo
    modules: list[torch.nn.Module]  # the GPTModel chunks (one, or VP with interleaving)
    chunks: list[torch.nn.Module]  # the same, each in Megatron's DDP when built with `data_parallel`


def build_for_rank(hf: HFModelConfig, layout: ParallelLayout, *, precision: PrecisionConfig | None = None,
                   use_transformer_engine: bool = False, make_vocab_size_divisible_by: int = 128,
                   freeze_router: bool = False, data_parallel: argparse.Namespace | None = None,
                   weights: checkpoint_format.CheckpointInfo | None = None, **config_options) -> RankModel:
    """The model chunks of this rank at `layout` (Megatron's parallel state already initialized there).

    `config_options`: `build_transformer_config`'s other keywords. Then, in the trainer's order: the router frozen
    (`freeze_router`), each chunk in Megatron's DDP with the DDP flags of `data_parallel` (`wrap_data_parallel`),
    and the model weights of `weights` loaded (the trainer loads them with its optimizer state instead).
    """
    config = build_transformer_config(hf, **layout.transformer_config_kwargs(), precision=precision,
                                      **config_options)
    vocab = model.vocab_info(hf, make_vocab_size_divisible_by, layout.tensor_model_parallel_size)
    modules = model.build_model(config, hf, vocab, use_transformer_engine)
    if freeze_router:
        model.freeze_router(modules)
    chunks = modules if data_parallel is None else wrap_data_parallel(config, data_parallel, modules)
    if weights is not None:
        checkpoint_weights.load_model_weights(weights, chunks)
    return RankModel(config, vocab, modules, chunks)


def wrap_data_parallel(config, args, modules) -> list[DistributedDataParallel]:
    """Megatron's DDP around each model chunk (distributed optimizer), and the schedule's hooks into it."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=optimizers.grad_reduce_in_fp32(args), use_distributed_optimizer=True,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        bucket_size=args.ddp_bucket_size)
    chunks = [DistributedDataParallel(config, ddp_config, module) for module in modules]
    config.finalize_model_grads_func = finalize_model_grads
    one_or_all = (lambda funcs: funcs[0] if len(funcs) == 1 else funcs)  # noqa: E731
    if args.overlap_grad_reduce:
        # Reductions start only after the last micro-batch's backward (no_sync before), bucket by bucket.
        config.no_sync_func = one_or_all([chunk.no_sync for chunk in chunks])
        config.grad_sync_func = one_or_all([chunk.start_grad_sync for chunk in chunks])
    elif len(chunks) > 1:
        config.no_sync_func = [chunk.no_sync for chunk in chunks]
    return chunks
