"""ORPO micro-batches through Megatron-Core's pipeline schedule (1F1B, interleaved with VP, or no pipelining).

Owns the glue between `get_forward_backward_func()` and the objective: checking host micro-batches and moving
them to the accelerator once each, giving the schedule shapes it can exchange, the forward step (packed rows as
THD with `cu_seqlens`), the loss function with its normalization, and collecting metric sums and per-pair
values from the last pipeline stage. Used by the trainer (forward + backward) and the evaluator (forward only).
It does not step the optimizer.

Nothing in the per-micro-batch path reads a device value back to the host: validation happens on the host
before the move, and metric sums stay tensors until `ScheduleResult.metrics`.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe import moe_utils

from orpo_megatron.data.micro_batch import MicroBatch
from orpo_megatron.objective import (
    GlobalNormalizers,
    ORPOConfig,
    ORPOMetricSums,
    PairValues,
    check_micro_batch,
    orpo_loss,
)


def accelerator() -> torch.device | None:
    """Where micro-batches go: this process's GPU, or None on a machine without one (they stay on the host)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


@dataclasses.dataclass
class ScheduleResult:
    """What one pass over a step's micro-batches produced.

    `sums` are this rank's (summed over its micro-batches, still on the device) and only set on the last
    pipeline stage; `pairs` are this rank's micro-batches' per-pair values (last stage only, when asked for);
    `positions` are the positions this rank computed, padding that `schedule_groups` added included.
    """

    sums: ORPOMetricSums | None
    pairs: list[PairValues]
    positions: int

    def metrics(self, orpo_config: ORPOConfig) -> dict[str, float] | None:
        """TRL-named metrics of the whole batch: sums over the data-parallel ranks, read back once."""
        if self.sums is None:
            return None
        return self.sums.all_reduce(parallel_state.get_data_parallel_group()).finalize(orpo_config)


def router_padding_mask(batch: MicroBatch, model_chunk: torch.nn.Module) -> torch.Tensor:
    """True at padding positions, so the MoE router leaves them out of its load-balancing loss (as HF does).

    GPTModel splits the mask for sequence parallelism only on the first pipeline stage; later stages get their
    TP rank's sequence slice here.
    """
    padding = batch.padding_mask
    module = getattr(model_chunk, "module", model_chunk)
    if module.config.sequence_parallel and not module.pre_process:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        padding = padding.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=1)[tp_rank]
    return padding


def packed_seq_params(batch: MicroBatch) -> PackedSeqParams | None:
    """THD parameters of a packed row (None for padded rows): attention and RoPE restart at every boundary."""
    if not batch.packed:
        return None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
                           max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)


def _forward_step(orpo_config: ORPOConfig, normalizers: GlobalNormalizers | None, loss_scale: float,
                  data_iterator, model_chunk):
    """Padded rows attend causally (right padding: no real position sees padding); packed rows attend causally
    within each sequence."""
    batch = next(data_iterator)
    output = model_chunk(batch.input_ids, batch.position_ids, attention_mask=None,
                         packed_seq_params=packed_seq_params(batch),
                         padding_mask=router_padding_mask(batch, model_chunk))
    return output, partial(_loss_func, orpo_config, normalizers, loss_scale, batch)


def _loss_func(orpo_config: ORPOConfig, normalizers: GlobalNormalizers | None, loss_scale: float,
               batch: MicroBatch, vocab_parallel_logits: torch.Tensor):
    result = orpo_loss(vocab_parallel_logits, batch, orpo_config, normalizers)
    # Megatron divides each micro-batch's loss by the number of micro-batches and DDP averages gradients over
    # DP ranks; our loss is already normalized by the global batch's counts, so undo both.
    return result.loss * loss_scale, {"sums": result.sums, "pairs": result.pairs}


def schedule_groups(micro_batches: list[MicroBatch], pipelined: bool) -> list[list[MicroBatch]]:
    """The micro-batches of each schedule call, with shapes the schedule can run.

    Pipeline stages exchange activations of the shape given to the schedule (Megatron's variable-shape mode
    deadlocks in the interleaved schedule on gloo and rules out the allgather dispatcher), so with pipelining
    consecutive micro-batches with the same number of rows form a group padded to its longest row. Padded rows
    (`--no-packing`) are grouped that way without pipelining too; packed rows without pipelining keep their own
    lengths in one call.
    """
    if not pipelined and micro_batches and micro_batches[0].packed:
        return [micro_batches]
    groups: list[list[MicroBatch]] = []
    for batch in micro_batches:
        if groups and groups[-1][0].input_ids.shape[0] == batch.input_ids.shape[0]:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [[b.padded_to(max(x.input_ids.shape[1] for x in group)) for b in group] for group in groups]


def run_micro_batches(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    orpo_config: ORPOConfig,
    forward_only: bool,
    normalizers: GlobalNormalizers | None = None,
    collect_pairs: bool = False,
) -> ScheduleResult:
    """Forward (and backward unless `forward_only`) of this rank's host micro-batches of one step.

    Training normalizes by `normalizers`, the counts of the whole global batch, so the loss and the gradients do
    not depend on the parallel layout or on the micro-batch split; forward-only passes may normalize each
    micro-batch by itself (None).
    """
    if not forward_only:
        if normalizers is None:
            raise ValueError("training needs the global batch's normalizers")
        moe_utils.clear_aux_losses_tracker()
    vocab_size = orpo_config.vocab_size
    for batch in micro_batches:
        check_micro_batch(batch, vocab_size)
    dp_size = parallel_state.get_data_parallel_world_size()
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    device = accelerator()
    outputs = []
    positions = 0
    for group in schedule_groups(micro_batches, pipelined):
        positions += sum(batch.num_positions for batch in group)
        # Once per micro-batch, read by every model chunk. CPU tests check the move (every tensor field) and the
        # loss on the meta device; the model's forward cannot run there (Megatron's collectives and buffers need
        # real memory), so the GPU acceptance command checks that a packed step runs with the batch on the GPU.
        on_device = [batch.to_device(device) for batch in group]
        # The interleaved schedule reads one iterator per model chunk.
        iterators = [iter(on_device) for _ in model_chunks]
        outputs += get_forward_backward_func()(
            forward_step_func=partial(_forward_step, orpo_config, normalizers, float(len(group) * dp_size)),
            data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
            model=model_chunks,
            num_microbatches=len(group),
            seq_length=group[0].input_ids.shape[1],
            micro_batch_size=group[0].input_ids.shape[0],
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return ScheduleResult(None, [], positions)
    return ScheduleResult(ORPOMetricSums.total(output["sums"] for output in outputs),
                          [output["pairs"] for output in outputs] if collect_pairs else [], positions)

