"""Worker: what one real training step moves and computes on each rank, for the step-work model's test.

For each layout (world 2; TP2+SP and EP2 also with full recomputation), builds the model, DDP and the distributed
optimizer with the trainer's own functions from the trainer's flags (so DDP overlaps nothing, as the trainer on a
CPU, except at "ep2_overlap": the GPU default, overlapped gradient reduction and parameter gathering, with small
buckets) and runs one `train.train_step` on padded micro-batches of different lengths per DP rank, recording on
each rank:
- every collective torch.distributed is asked for inside the step, in the bytes the model counts (see
  `orpo_megatron/step_work.py`: all-gather received, reduce-scatter sent, all-to-all sent/received,
  point-to-point), keyed by the ranks of its group; all-reduces as one total;
- the shapes the model was called with (rows x length, each row's real length) and, per MoE layer and
  micro-batch, how many token copies this rank's router sent to each expert;
- the matmul FLOPs torch dispatched (FlopCounterMode);
- at DP2: the FLOPs of each real sequence run alone, and of all of them packed into one row;
- at "offload": what the offloading optimizer keeps on the host, the bytes its AdamW kernel reads and writes, and
  the host side of its host<->device copies in one step (a dispatch mode over its step; the CPU backend lets the
  hybrid optimizer split its parameters into a device and a host part as on a GPU);
- the DDP settings the run used (overlap, bucket size) and the number of buckets DDP made.
Collectives are recorded at torch.distributed's entry points, before the CPU backend's gloo bridges, so padded
gloo workarounds do not count.
"""
import argparse
import functools
import sys

import torch
import torch.distributed as dist
from layout_runs import measure_layouts
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from orpo_megatron import cpu_backend, optimizer as optimizers, parallel, train
from orpo_megatron.data.batching import TrainStep
from orpo_megatron.data.micro_batch import padded_micro_batch
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig
from orpo_megatron.objective import ORPOConfig
from orpo_megatron.rank_model import build_for_rank

OFFLOAD = ["--use-precision-aware-optimizer", "--optimizer-cpu-offload"]
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "5000"]
LAYOUTS = {  # parallel layout, bf16, full recomputation, the trainer's optimizer and DDP flags
    "tp2": (dict(tensor_model_parallel_size=2, sequence_parallel=True), True, False, []),
    "ep2": (dict(expert_model_parallel_size=2), True, False, []),
    "pp2": (dict(pipeline_model_parallel_size=2), True, False, []),
    "dp2": (dict(), False, False, []),
    "tp2_recompute": (dict(tensor_model_parallel_size=2, sequence_parallel=True), True, True, []),
    "ep2_recompute": (dict(expert_model_parallel_size=2), True, True, []),
    "ep2_overlap": (dict(expert_model_parallel_size=2), True, False, OVERLAP),
    "offload": (dict(), True, False, OFFLOAD),
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


def micro_batches(hf: HFModelConfig, dp_rank: int) -> list:
    """Pairs of different lengths on each DP rank (prompt 5-19, completions 3-11 tokens), one per micro-batch,
    padded (rows a multiple of TP long)."""
    generator = torch.Generator().manual_seed(7 + dp_rank)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    batches = []
    for index in range(MICRO_BATCHES):
        ids = lambda n: torch.randint(3, hf.vocab_size, (n,), generator=generator).tolist()  # noqa: E731
        pair = {"prompt_input_ids": [ids(draw(5, 20))], "chosen_input_ids": [ids(draw(3, 12))],
                "rejected_input_ids": [ids(draw(3, 12))], "row_index": [index]}
        tp = parallel_state.get_tensor_model_parallel_world_size()
        batches.append(padded_micro_batch(pair, pad_id=0, length_multiple=tp))
    return batches


def train_step_of(hf: HFModelConfig) -> TrainStep:
    """This DP rank's micro-batches, with the counts of the whole global batch (every DP rank's pairs)."""
    dp = parallel_state.get_data_parallel_world_size()
    everyone = [batch for rank in range(dp) for batch in micro_batches(hf, rank)]
    return TrainStep(micro_batches=micro_batches(hf, parallel_state.get_data_parallel_rank()),
                     num_pairs=sum(batch.num_pairs for batch in everyone),
                     num_chosen_real_targets=sum(batch.num_chosen_real_targets for batch in everyone),
                     num_chosen_completion_targets=sum(batch.num_chosen_completion_targets for batch in everyone))


def trainer_flags(flags: list[str]) -> argparse.Namespace:
    """The trainer's optimizer and DDP flags as the trainer resolves them (DDP overlap off on a CPU by default)."""
    parser = argparse.ArgumentParser()
    optimizers.add_optimizer_args(parser)
    optimizers.add_ddp_args(parser)
    args = parser.parse_args(flags)
    optimizers.check_ddp_args(parser, args)
    # The schedule flags build_scheduler reads.
    args.lr, args.min_lr, args.lr_decay_iters, args.lr_warmup_iters, args.lr_decay_style = 1e-4, 0, None, 0, "constant"
    return args


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
    lengths = [list(batch.sequence_lengths) for batch in batches]
    return calls, routing, lengths, handles


def training_flops_of(module, input_ids: torch.Tensor) -> tuple[int, int]:
    """FLOPs of a forward + backward: all matmuls, and the attention products' (the local spec's only batched
    matmuls)."""
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with FlopCounterMode(display=False) as counter:
        module(input_ids, positions, attention_mask=None).float().sum().backward()
    ops = counter.get_flop_counts()["Global"]
    return counter.get_total_flops(), ops.get(torch.ops.aten.bmm, 0) + ops.get(torch.ops.aten.baddbmm, 0)


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
    options, bf16, recompute, flags = LAYOUTS[name]
    args = trainer_flags(flags)
    hf = HFModelConfig.from_file(hf_dir)
    layout = parallel.initialize(options, hf)
    built = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=bf16), data_parallel=args,
                           recompute_granularity="full" if recompute else None)
    config, chunks = built.config, built.chunks
    optimizer = optimizers.build_optimizer(args, chunks, bf16, config.params_dtype)
    config.grad_scale_func = optimizer.scale_loss
    scheduler = train.build_scheduler(args, optimizer, 10)
    host = measure_host_optimizer(optimizer) if args.optimizer_cpu_offload else None
    if host is not None:  # the CPU backend makes the hybrid optimizer split as on a GPU
        assert all(opt.cpu_copys_map_gpu_param for opt in host[0]), "the offloading optimizer kept nothing on the host"
    step = train_step_of(hf)
    calls, routing, lengths, handles = record_shapes_and_routing(chunks, step.micro_batches)

    recorder.records, recorder.all_reduce_bytes, recorder.active = {}, 0, True
    with FlopCounterMode(display=False) as counter:
        train.train_step(chunks, optimizer, scheduler, step, ORPOConfig(vocab_size=hf.vocab_size))
    recorder.active = False
    for handle in handles:
        handle.remove()

    ddp = chunks[0].ddp_config
    result = {
        "layout": name, "rank": dist.get_rank(), "world_size": dist.get_world_size(), "bf16": bf16,
        "parallel": options, "recompute": recompute, "calls": calls, "lengths": lengths, "routing": routing,
        "ddp": {"overlap_grad_reduce": ddp.overlap_grad_reduce, "overlap_param_gather": ddp.overlap_param_gather,
                "bucket_size": args.ddp_bucket_size},
        "buckets": sum(len(b.buckets) for chunk in chunks for b in chunk.buffers + chunk.expert_parallel_buffers),
        "traffic": [[kind, list(group), value] for (kind, group), value in recorder.records.items()],
        "all_reduce_bytes": recorder.all_reduce_bytes, "flops": counter.get_total_flops(),
    }
    if name == "dp2":
        sequences = [torch.randint(3, hf.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                     for row_lengths in lengths for n in row_lengths]
        module = chunks[0].module
        alone = [training_flops_of(module, ids) for ids in sequences]
        result["single_sequence_flops"] = [total for total, _ in alone]
        result["single_sequence_attention_flops"] = [attention for _, attention in alone]
        result["packed_row_flops"] = training_flops_of(module, torch.cat(sequences, dim=1))[0]
    if host is not None:
        result["host_optimizer"] = host_optimizer_bytes(*host)
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    cpu_backend.activate()  # first, so its gloo bridges sit below the recorder
    recorder = CollectiveRecorder()
    measure_layouts(LAYOUTS, lambda hf_dir, name: run_layout(hf_dir, name, recorder))


if __name__ == "__main__":
    main()
