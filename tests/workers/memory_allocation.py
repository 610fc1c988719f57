"""Worker: the real per-rank memory of the tiny model at several layouts, for the memory estimator's test.

For each layout (TP2 / EP2 / DP2 in fp32 / PP2 / TP2 with experts EP2 ETP1, and optimizer modes that offload, world 2), builds the Megatron
model, wraps it in DDP with the distributed optimizer built by the trainer's own `optimizer.build_optimizer`
from the layout's optimizer flags, takes one optimizer step so Adam's state exists, and records on each rank:
the parameter list (name, numel, expert or not), the DDP param and grad buffers, and the optimizer's own
tensors (those not sharing storage with the model's buffers) on the device and on the host: main params, Adam
moments and gradient copies. For the offloading hybrid optimizer its GPU sub-optimizer's tensors are the
device ones and its CPU sub-optimizers' the host ones (the CPU backend lets it split as on a GPU). For the
TP2, EP2, DP2 and ETP1 layouts also the bytes of every tensor saved for backward by one forward of a micro-batch
through the model and ORPO log-probs.
"""
import torch
from layout_runs import measure_layouts, optimizer_flags
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

from orpo_megatron import optimizer as optimizers, parallel
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig
from orpo_megatron.objective import vocab_parallel_logps
from orpo_megatron.rank_model import build_for_rank

OFFLOAD = ["--use-precision-aware-optimizer", "--optimizer-cpu-offload"]
LAYOUTS = {  # parallel layout, bf16, the trainer's optimizer flags
    "tp2": (dict(tensor_model_parallel_size=2, sequence_parallel=True), True, []),
    "ep2": (dict(expert_model_parallel_size=2), True, []),
    "dp2_fp32": (dict(), False, []),
    "pp2": (dict(pipeline_model_parallel_size=2), True, []),  # activations not measured (one stage alone)
    "tp2_etp1": (dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                      expert_tensor_parallel_size=1), True, []),
    "ep2_offload": (dict(expert_model_parallel_size=2), True, OFFLOAD),
    "ep2_offload_half": (dict(expert_model_parallel_size=2), True, OFFLOAD + ["--optimizer-offload-fraction", "0.5"]),
    "tp2_offload_half_bf16_grads": (dict(tensor_model_parallel_size=2, sequence_parallel=True), True,
                                    OFFLOAD + ["--optimizer-offload-fraction", "0.5", "--main-grads-dtype", "bf16"]),
    "dp2_buckets": (dict(), True, []),
}
# Bucketed gradient reduction (the GPU default) with buckets small enough to split the tiny model's buffers.
DDP_OVERRIDES = {"dp2_buckets": dict(overlap_grad_reduce=True, bucket_size=5000)}
MEASURE_ACTIVATIONS = ("tp2", "ep2", "dp2_fp32", "tp2_etp1")
PAIRS, SEQ = 2, 32


def storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_tensors(sub_optimizer, buffer_storages: set[int]) -> tuple[int, int]:
    """(main-param bytes, moment + gradient-copy bytes) a torch optimizer holds beyond the model's buffers."""
    params = [p for group in sub_optimizer.param_groups for p in group["params"]]
    own = lambda tensors: [t for t in tensors if t is not None and storage_ptr(t) not in buffer_storages]  # noqa: E731
    moments = [sub_optimizer.state.get(p, {}).get(k) for p in params for k in ("exp_avg", "exp_avg_sq")]
    return tensor_bytes(own(params)), tensor_bytes(own(moments)) + tensor_bytes(own(p.grad for p in params))


def optimizer_allocation(optimizer, buffer_storages: set[int]) -> dict:
    """Bytes of the optimizer's main params and state on the device and on the host."""
    found = {"main_param_bytes": 0, "optimizer_state_bytes": 0, "host_bytes": 0}
    for distributed in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = distributed.optimizer
        parts = [(inner, True)]
        if isinstance(inner, HybridDeviceOptimizer):
            parts = [(sub, sub is inner.gpu_optimizer) for sub in inner.sub_optimizers]
        for sub, on_device in parts:
            main, state = optimizer_tensors(sub, buffer_storages)
            if on_device:
                found["main_param_bytes"] += main
                found["optimizer_state_bytes"] += state
            else:
                found["host_bytes"] += main + state
    return found


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
    options, bf16, flags = LAYOUTS[layout_name]
    args = optimizer_flags(flags)
    hf = HFModelConfig.from_file(hf_dir)
    layout = parallel.initialize(options, hf)
    built = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=bf16))
    config = built.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=optimizers.grad_reduce_in_fp32(args),
                                               use_distributed_optimizer=True, **DDP_OVERRIDES.get(layout_name, {}))
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in built.modules]
    optimizer = optimizers.build_optimizer(args, chunks, bf16, config.params_dtype)

    buffers = [(buffer, "expert") for chunk in chunks for buffer in chunk.expert_parallel_buffers] + [
        (buffer, "dense") for chunk in chunks for buffer in chunk.buffers]
    buffer_storages = {storage_ptr(b.param_data) for b, _ in buffers} | {storage_ptr(b.grad_data) for b, _ in buffers}
    params = [{"name": name, "numel": p.numel(), "expert": not getattr(p, "allreduce", True)}
              for chunk in chunks for name, p in chunk.module.named_parameters()]

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.step()  # Adam allocates its moments on the first step

    activations = None
    if layout_name in MEASURE_ACTIVATIONS:
        activations = saved_activation_bytes(chunks[0].module, hf, buffer_storages)
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
        "buckets": sum(len(b.buckets) for b, _ in buffers),
        **optimizer_allocation(optimizer, buffer_storages),
        "activation_bytes": activations,
        "micro_batch": {"pairs": PAIRS, "seq_length": SEQ},
    }
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    measure_layouts(LAYOUTS, measure)


if __name__ == "__main__":
    main()
