"""Worker: Megatron-LM's side of checkpoint interoperability, with plain megatron-core and its stock layer spec.

Megatron-LM's training code is not installed here; this worker does with megatron-core what its
`save_checkpoint` / `load_checkpoint` do for a torch_dist checkpoint (megatron/training/checkpointing.py,
core_v0.16.1), using none of orpo-megatron's checkpoint code.

--mode write (TP2 x EP2, world 4): a GPTModel on megatron-core's stock local layer spec, the HF weights copied in,
  DDP with the distributed optimizer and Adam's state initialized by one zero-gradient step at LR 0 (weights
  unchanged), saved as iteration 10: the state dict `generate_state_dict` builds (model, optimizer in
  Megatron-LM's default dp_reshardable form, opt_param_scheduler, rng_state, args, checkpoint_version,
  iteration), written by the default torch_dist strategy wrapped for fully parallel save, with the content
  metadata, then the tracker file. The args are those of Megatron-LM's Mixtral example flags for this model.
--mode read (any layout): the stock-spec model, ROOT loaded as `load_checkpoint` does (tracker -> folder,
  content metadata from common.pt, `dist_checkpointing.load` of the model's sharded state dict at Megatron-LM's
  default strictness, a strict `load_state_dict`), then the logits of --tokens (rank 0 writes logits.pt).
"""
import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# Importing orpo_megatron.model binds megatron-core 0.16.1's missing router GEMM name on machines without
# Transformer Engine (Megatron-LM itself would need the same there); the stock spec is still Megatron's own.
from orpo_megatron import model as _binds_router_gemm, parallel  # noqa: F401
from orpo_megatron.model_config import HFModelConfig, build_transformer_config, padded_vocab_size

ITERATION = 10
# The stock local spec names the MoE pre-MLP norm after linear_fc1; the TE spec (what pretrain_gpt.py builds on
# GPUs, and the name checkpoints carry) keeps it a module of its own.
LOCAL_TO_TE = {"decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight"}


def stock_model(hf: HFModelConfig, layout: dict) -> GPTModel:
    config = build_transformer_config(hf, **layout)
    spec = get_gpt_layer_local_spec(num_experts=hf.num_experts, moe_grouped_gemm=False, normalization="RMSNorm",
                                    qk_layernorm=config.qk_layernorm)
    return GPTModel(config=config, transformer_layer_spec=spec,
                    vocab_size=padded_vocab_size(hf.vocab_size, 128, layout["tensor_model_parallel_size"]),
                    max_sequence_length=hf.max_position_embeddings, pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=hf.tie_word_embeddings, position_embedding_type="rope",
                    rotary_base=int(hf.rope_theta))


def megatron_lm_args(hf: HFModelConfig, layout: dict, world: int) -> argparse.Namespace:
    """What Megatron-LM's parser yields for its Mixtral example flags (examples/mixtral) scaled to this model."""
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    return argparse.Namespace(
        num_layers=hf.num_layers, hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, group_query_attention=True,
        num_query_groups=hf.num_key_value_heads, kv_channels=hf.head_dim, seq_length=64,
        max_position_embeddings=hf.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=int(hf.rope_theta), rotary_percent=1.0, swiglu=True,
        normalization="RMSNorm", norm_epsilon=hf.rms_norm_eps, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, add_qkv_bias=False, attention_dropout=0.0, hidden_dropout=0.0,
        num_experts=hf.num_experts, moe_router_topk=hf.num_experts_per_tok, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False, moe_shared_expert_intermediate_size=None, moe_layer_freq=1,
        moe_ffn_hidden_size=None, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/models/tiny",
        make_vocab_size_divisible_by=128, padded_vocab_size=padded_vocab_size(hf.vocab_size, 128, tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=layout["expert_model_parallel_size"], world_size=world,
        data_parallel_size=world // (tp * pp), use_distributed_optimizer=True, ckpt_format="torch_dist",
        micro_batch_size=1, global_batch_size=8, train_iters=100, lr=1e-5, iteration=ITERATION,
        consumed_train_samples=ITERATION * 8, bf16=False, fp16=False, no_save_optim=False, no_save_rng=False,
    )


def rng_state() -> ShardedObject:
    """Megatron-LM's `get_rng_state` for torch_dist with expert parallelism (shards by PP, TP, DP)."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    return ShardedObject(
        "rng_state", [state],
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
         parallel_state.get_data_parallel_world_size(with_context_parallel=True)),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
         parallel_state.get_data_parallel_rank(with_context_parallel=True)),
        replica_id=0)


def write(hf: HFModelConfig, layout: dict, hf_dir: str, root: str) -> None:
    from reference_weights import load_hf_checkpoint  # a sibling module: this runs as a torchrun worker

    model = stock_model(hf, layout)
    load_hf_checkpoint([model], hf_dir, hf)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.0, use_distributed_optimizer=True), [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-5, min_lr=0.0, lr_warmup_steps=0,
                                        lr_decay_steps=100, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=100, wd_incr_style="constant")
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for param in ddp.parameters():
        param.main_grad.zero_()
    optimizer.step()  # LR 0 and zero gradients: the weights stay the HF weights, Adam's state now exists

    metadata = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = {"args": megatron_lm_args(hf, layout, dist.get_world_size()), "checkpoint_version": 3.0,
             "iteration": ITERATION, "model": model.sharded_state_dict(metadata=metadata)}
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    state.update(opt_param_scheduler=scheduler.state_dict(), rng_state=rng_state(),
                 num_floating_point_operations_so_far=0)
    folder = os.path.join(root, f"iter_{ITERATION:07d}")
    if dist.get_rank() == 0:
        os.makedirs(folder)
    dist.barrier()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                                parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist_checkpointing.save(state, folder, strategy,
                            content_metadata={k: v for k, v in metadata.items() if k != "dp_cp_group"})
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))


def read(hf: HFModelConfig, layout: dict, root: str, tokens: torch.Tensor, out: str) -> None:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        tracked = f.read().strip()
    folder = os.path.join(root, "release" if tracked == "release" else f"iter_{int(tracked):07d}")
    common = dist_checkpointing.load_common_state_dict(folder)
    metadata = dict(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {},
                    dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    model = stock_model(hf, layout)
    request = model.sharded_state_dict(metadata=metadata)
    for entry in request.values():
        entry.key = LOCAL_TO_TE.get(entry.key, entry.key)
    loaded = dist_checkpointing.load({"model": request}, folder)  # Megatron-LM's default: assume_ok_unexpected
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    if dist.get_rank() == 0:
        torch.save(logits[..., : hf.vocab_size], os.path.join(out, "logits.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["write", "read"], required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--tokens", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    args = parser.parse_args()
    hf = HFModelConfig.from_file(args.hf_dir)
    # Sequence parallelism off: the stock spec's torch norm refuses it (construction and saving need no forward).
    layout = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=args.ep, sequence_parallel=False)
    parallel.initialize(layout, hf)
    if args.mode == "write":
        write(hf, layout, args.hf_dir, args.root)
    else:
        read(hf, layout, args.root, torch.load(args.tokens), args.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
