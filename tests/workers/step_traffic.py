"""Worker: what one real training step moves and computes on each rank, for the step-work model's test.

For each layout (world 2; TP2+SP and EP2 also with full recomputation), builds the model, DDP and the distributed
optimizer as the trainer does and runs one `train.train_step` on micro-batches of different lengths per DP rank,
recording on each rank:
- every collective torch.distributed is asked for inside the step, in the bytes the model counts (see
  `orpo_megatron/step_work.py`: all-gather received, reduce-scatter sent, all-to-all sent/received,
  point-to-point), keyed by the ranks of its group; all-reduces as one total;
- the shapes the model was called with (rows x length, each row's real length) and, per MoE layer and
  micro-batch, how many token copies this rank's router sent to each expert;
- the matmul FLOPs torch dispatched (FlopCounterMode);
- at DP2: the FLOPs of each real sequence run alone, and of all of them packed into one row;
- at "offload": what the offloading optimizer keeps on the host, the bytes its AdamW kernel reads and writes, and
  the host side of its host<->device copies in one step (a dispatch mode over its step).
Collectives are recorded at torch.distributed's entry points, before the CPU backend's gloo bridges, so padded
gloo workarounds do not count.
"""
import argparse
import functools
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.moe.router import TopKRouter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from orpo_megatron import cpu_backend, model, parallel, train
from orpo_megatron.data.batching import collate_pairs
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig, build_transformer_config
from orpo_megatron.objective import ORPOConfig

LAYOUTS = {
    "tp2": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True), bf16=True),
    "ep2": dict(parallel=dict(expert_model_parallel_size=2), bf16=True),
    "pp2": dict(parallel=dict(pipeline_model_parallel_size=2), bf16=True),
    "dp2": dict(parallel=dict(), bf16=False),
    "tp2_recompute": dict(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True), bf16=True,
                          recompute="full"),
    "ep2_recompute": dict(parallel=dict(expert_model_parallel_size=2), bf16=True, recompute="full"),
    "offload": dict(parallel=dict(), bf16=True, offload=True),
}
MICRO_BATCHES = 2  # per DP rank, one pair each


class CollectiveRecorder:
    """Wraps torch.distributed's collectives (every module-level alias of them) to record their bytes."""

    NAMES = ["all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
             "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "isend", "irecv", "send", "recv"]

    def __init__(self):
        self.active = False
        self.depth = 0  # collectives calling collectives (the CPU bridges) count once
        self.records: dict[tuple, int] = {}
        self.all_reduce_bytes = 0
        for name in self.NAMES:
            original = getattr(dist, name)
            wrapper = self._wrap(name, original)
            for module in list(sys.modules.values()):
                for key, value in list(getattr(module, "__dict__", {}).items()):
                    if value is original:
                        setattr(module, key, wrapper)

    def _wrap(self, name, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            if self.active and not self.depth:
                self._record(name, args, kwargs)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
        return recorded

    def _add(self, kind: str, group, value: int) -> None:
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
        if len(ranks) > 1 and value:
            self.records[kind, ranks] = self.records.get((kind, ranks), 0) + value

    def _record(self, name, args, kwargs):
        def arg(index, key, default=None):
            return args[index] if len(args) > index else kwargs.get(key, default)

        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        if name == "all_reduce":
            self.all_reduce_bytes += nbytes(arg(0, "tensor"))
        elif name in ("all_gather_into_tensor", "_all_gather_base"):
            self._add("all-gather", arg(2, "group"), nbytes(arg(0, "output_tensor")) - nbytes(arg(1, "input_tensor")))
        elif name == "all_gather":
            self._add("all-gather", arg(2, "group"), sum(map(nbytes, arg(0, "tensor_list"))) - nbytes(arg(1, "tensor")))
        elif name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
            self._add("reduce-scatter", arg(3, "group"), nbytes(arg(1, "input")) - nbytes(arg(0, "output")))
        elif name == "reduce_scatter":
            inputs = sum(map(nbytes, arg(1, "input_list")))
            self._add("reduce-scatter", arg(3, "group"), inputs - nbytes(arg(0, "output")))
        elif name == "all_to_all_single":
            output, inp, group = arg(0, "output"), arg(1, "input"), arg(4, "group")
            me = dist.get_rank(group)
            for kind, tensor, splits in (("all-to-all send", inp, arg(3, "input_split_sizes")),
                                         ("all-to-all recv", output, arg(2, "output_split_sizes"))):
                row = nbytes(tensor) // max(tensor.shape[0], 1)
                self._add(kind, group, sum(int(n) for i, n in enumerate(splits) if i != me) * row)
        elif name in ("isend", "send", "irecv", "recv"):
            kind = "send" if "send" in name else "recv"
            self._add(kind, arg(3, "group"), nbytes(arg(0, "tensor")))


def micro_batches(hf: HFModelConfig, dp_rank: int) -> list[dict]:
    """Pairs of different lengths on each DP rank (prompt 5-19, completions 3-11 tokens), one per micro-batch."""
    generator = torch.Generator().manual_seed(7 + dp_rank)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    batches = []
    for index in range(MICRO_BATCHES):
        ids = lambda n: torch.randint(3, hf.vocab_size, (n,), generator=generator).tolist()  # noqa: E731
        pair = {"prompt_input_ids": [ids(draw(5, 20))], "chosen_input_ids": [ids(draw(3, 12))],
                "rejected_input_ids": [ids(draw(3, 12))], "row_index": [index]}
        tp = parallel_state.get_tensor_model_parallel_world_size()
        batches.append(collate_pairs(pair, pad_id=0, pad_to_multiple_of=tp))
    return batches


def record_shapes_and_routing(chunks, batches):
    """Forward pre-hooks: each model call's input shape; router hooks: token copies per expert per call."""
    calls, routing = [], []

    def on_forward(module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        calls.append(list(input_ids.shape))

    def on_route(module, args, output):
        routing_map = output[1]
        routing.append({"layer": module.layer_number, "micro_batch": len(calls) - 1,
                        "copies": routing_map.sum(dim=0).tolist()})

    handles = [chunk.module.register_forward_pre_hook(on_forward, with_kwargs=True) for chunk in chunks]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    handles += [router.register_forward_hook(on_route) for router in routers]
    lengths = [batch["attention_mask"].sum(dim=1).tolist() for batch in batches]
    return calls, routing, lengths, handles


def training_flops_of(module, input_ids: torch.Tensor) -> int:
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with FlopCounterMode(display=False) as counter:
        module(input_ids, positions, attention_mask=None).float().sum().backward()
    return counter.get_total_flops()


class HostOptimizerOps(TorchDispatchMode):
    """Inside the offloading optimizer's step: bytes the AdamW kernel reads and writes, and every copy (its
    destination and source storages and byte sizes), to be sorted into host<->device transfers afterwards."""

    def __init__(self):
        super().__init__()
        self.adam_bytes = 0
        self.copies = []  # (destination storage, source storage, destination bytes, source bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._fused_adamw_.default:
            # params, grads, exp_avgs, exp_avg_sqs are read; params, exp_avgs, exp_avg_sqs written.
            params, grads, exp_avgs, exp_avg_sqs = args[:4]
            size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
            self.adam_bytes += 2 * size(params) + size(grads) + 2 * size(exp_avgs) + 2 * size(exp_avg_sqs)
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            self.copies.append((storage(dst), storage(src), dst.numel() * dst.element_size(),
                                src.numel() * src.element_size()))
        return func(*args, **kwargs)


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def measure_host_optimizer(optimizer) -> tuple[list, HostOptimizerOps]:
    """The offloading optimizers, with an op recorder around each of their steps."""
    hybrid = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    ops = HostOptimizerOps()
    for opt in hybrid:
        def measured_step(*args, _step=opt.step, **kwargs):
            with ops:
                return _step(*args, **kwargs)
        opt.step = measured_step
    return hybrid, ops


def host_optimizer_bytes(hybrid: list, ops: HostOptimizerOps) -> dict:
    """Per step, over the host part: elements stepped, bytes kept (param copy, gradient buffer, state; each
    storage once), AdamW kernel bytes, and bytes of the host side of each host<->device copy."""
    elements, kept = 0, {}
    for opt in hybrid:
        for host_optimizer in opt.cpu_optimizers:
            for group in host_optimizer.param_groups:
                for p in group["params"]:
                    elements += p.numel()
                    tensors = [p, opt.cpu_copy_map_grad.get(p)] + list(host_optimizer.state[p].values())
                    kept.update({storage(t): t.untyped_storage().nbytes() for t in tensors
                                 if isinstance(t, torch.Tensor) and t.numel() > 1})
    to_host = sum(dst_bytes for dst, src, dst_bytes, _ in ops.copies if dst in kept and src not in kept)
    to_device = sum(src_bytes for dst, src, _, src_bytes in ops.copies if src in kept and dst not in kept)
    return {"elements": elements, "kept_bytes": sum(kept.values()), "adam_bytes": ops.adam_bytes,
            "to_host_bytes": to_host, "to_device_bytes": to_device}


def run_layout(hf_dir: str, name: str, recorder: CollectiveRecorder) -> dict:
    spec = LAYOUTS[name]
    hf = HFModelConfig.from_file(hf_dir)
    layout = parallel.initialize(spec["parallel"], hf)
    precision = PrecisionConfig(bf16=spec["bf16"])
    config = build_transformer_config(hf, **spec["parallel"], precision=precision,
                                      recompute_granularity=spec.get("recompute"))
    vocab = model.vocab_info(hf, 128, layout.tensor_model_parallel_size)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in model.build_model(config, hf, vocab)]
    config.finalize_model_grads_func = finalize_model_grads
    offload = dict(optimizer_cpu_offload=True, optimizer_offload_fraction=1.0, use_precision_aware_optimizer=True,
                   pin_cpu_grads=False, pin_cpu_params=False)  # pinned memory needs a CUDA device
    if spec.get("offload"):
        # OptimizerConfig checks TE's version for its param remainders and fails without TE (megatron-core
        # 0.16.1); the offloading optimizer does not use TE.
        from megatron.core.optimizer import optimizer_config
        optimizer_config.is_te_min_version = lambda *args, **kwargs: False
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, bf16=spec["bf16"], params_dtype=config.params_dtype, use_distributed_optimizer=True,
        **(offload if spec.get("offload") else {})), chunks)
    config.grad_scale_func = optimizer.scale_loss
    scheduler = train.build_scheduler(argparse.Namespace(lr_decay_iters=None, lr_warmup_iters=0, lr=1e-4, min_lr=0.0,
                                                         lr_decay_style="constant", weight_decay=0.0), optimizer, 10)
    host = measure_host_optimizer(optimizer) if spec.get("offload") else None
    if host is not None and not all(opt.cpu_copys_map_gpu_param for opt in host[0]):
        # Without a device the hybrid optimizer makes no host copies and cannot step (megatron-core 0.16.1 splits
        # by `is_cuda`), unless the CPU backend makes it split as on a GPU.
        parallel_state.destroy_model_parallel()
        return {"layout": name, "rank": dist.get_rank(), "host_optimizer": None,
                "skipped": "the CPU backend does not run the offloading optimizer's device/host split"}
    batches = micro_batches(hf, parallel_state.get_data_parallel_rank())
    calls, routing, lengths, handles = record_shapes_and_routing(chunks, batches)

    recorder.records, recorder.all_reduce_bytes, recorder.active = {}, 0, True
    with FlopCounterMode(display=False) as counter:
        train.train_step(chunks, optimizer, scheduler, batches, ORPOConfig(vocab_size=hf.vocab_size))
    recorder.active = False
    for handle in handles:
        handle.remove()

    result = {
        "layout": name, "rank": dist.get_rank(), "world_size": dist.get_world_size(), "bf16": spec["bf16"],
        "parallel": spec["parallel"], "recompute": spec.get("recompute") == "full", "calls": calls,
        "lengths": lengths, "routing": routing,
        "traffic": [[kind, list(group), value] for (kind, group), value in recorder.records.items()],
        "all_reduce_bytes": recorder.all_reduce_bytes, "flops": counter.get_total_flops(),
    }
    if name == "dp2":
        sequences = [torch.randint(3, hf.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                     for row_lengths in lengths for n in row_lengths]
        module = chunks[0].module
        result["single_sequence_flops"] = [training_flops_of(module, ids) for ids in sequences]
        result["packed_row_flops"] = training_flops_of(module, torch.cat(sequences, dim=1))
    if host is not None:
        result["host_optimizer"] = host_optimizer_bytes(*host)
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    args = parser.parse_args()
    cpu_backend.activate()  # first, so its gloo bridges sit below the recorder
    recorder = CollectiveRecorder()
    results = [run_layout(args.hf_dir, name, recorder) for name in args.layouts]
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
