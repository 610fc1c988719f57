"""Worker: the real per-rank memory of the tiny model at several layouts, for the memory estimator's test.

For each layout (TP2 / EP2 / DP2 in fp32 / PP2, world 2), builds the Megatron model, wraps it in DDP with the
distributed optimizer (as the trainer does), takes one optimizer step so Adam's state exists, and records on
each rank: the parameter list (name, numel, expert or not), the DDP param and grad buffers, the optimizer's
own fp32 main params (tensors not sharing storage with the model's buffers) and Adam moments, and the bytes
of every tensor saved for backward by one forward of a micro-batch through the model and ORPO log-probs.
"""
import argparse
import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from orpo_megatron import model, parallel
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig, build_transformer_config
from orpo_megatron.objective import vocab_parallel_logps

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True, bf16=True),
    "ep2": dict(expert_model_parallel_size=2, bf16=True),
    "dp2_fp32": dict(bf16=False),
    "pp2": dict(pipeline_model_parallel_size=2, bf16=True),  # activations not measured (one stage alone)
}
PAIRS, SEQ = 2, 32


def storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def saved_activation_bytes(chunk, hf: HFModelConfig, excluded: set[int]) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters' own storages excluded)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = storage_ptr(tensor)
        if ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.vocab_size, (2 * PAIRS, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(2 * PAIRS, SEQ)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = chunk(ids, positions, attention_mask=None)
        logps = vocab_parallel_logps(logits, ids.roll(-1, dims=1), hf.vocab_size)
    logps.sum().backward()
    return sum(seen.values())


def measure(hf_dir: str, layout_name: str) -> dict:
    options = dict(LAYOUTS[layout_name])
    bf16 = options.pop("bf16")
    hf = HFModelConfig.from_file(hf_dir)
    layout = parallel.initialize(options, hf)
    config = build_transformer_config(hf, **options, precision=PrecisionConfig(bf16=bf16))
    vocab = model.vocab_info(hf, 128, layout.tensor_model_parallel_size)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in model.build_model(config, hf, vocab)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=True), chunks)

    buffers = [(buffer, "expert") for chunk in chunks for buffer in chunk.expert_parallel_buffers] + [
        (buffer, "dense") for chunk in chunks for buffer in chunk.buffers]
    buffer_storages = {storage_ptr(b.param_data) for b, _ in buffers} | {storage_ptr(b.grad_data) for b, _ in buffers}
    params = [{"name": name, "numel": p.numel(), "expert": not getattr(p, "allreduce", True)}
              for chunk in chunks for name, p in chunk.module.named_parameters()]

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.step()  # Adam allocates its moments on the first step

    main_param_bytes = adam_bytes = 0
    for opt in optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                if storage_ptr(p) not in buffer_storages:  # fp32 params are views of the model's buffer
                    main_param_bytes += p.numel() * p.element_size()
                state = opt.optimizer.state.get(p, {})
                adam_bytes += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))

    single_stage = layout.pipeline_model_parallel_size == 1
    activations = saved_activation_bytes(chunks[0].module, hf, buffer_storages) if single_stage else None
    result = {
        "layout": layout_name,
        "rank": torch.distributed.get_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "expert_dp_size": parallel_state.get_expert_data_parallel_world_size(),
        "params": params,
        "param_buffer_bytes": {kind: sum(b.param_data.nbytes for b, k in buffers if k == kind)
                               for kind in ("dense", "expert")},
        "grad_buffer_bytes": {kind: sum(b.grad_data.nbytes for b, k in buffers if k == kind)
                              for kind in ("dense", "expert")},
        "main_param_bytes": main_param_bytes,
        "adam_state_bytes": adam_bytes,
        "activation_bytes": activations,
        "micro_batch": {"pairs": PAIRS, "seq_length": SEQ},
    }
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    args = parser.parse_args()
    results = [measure(args.hf_dir, name) for name in args.layouts]
    rank = torch.distributed.get_rank()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
