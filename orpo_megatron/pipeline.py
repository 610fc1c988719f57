"""ORPO micro-batches through Megatron-Core's pipeline schedule (1F1B, interleaved with VP, or no pipelining).

Owns the glue between `get_forward_backward_func()` and the objective: the forward step, the loss function
with its normalization, and collecting metric sums and per-pair values from the last pipeline stage. Used by
the trainer (forward + backward) and the evaluator (forward only). It does not step the optimizer.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Mapping

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe import moe_utils

from orpo_megatron.objective import GlobalNormalizers, ORPOConfig, ORPOMetricSums, PairValues, orpo_loss

MicroBatch = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class ScheduleResult:
    """What one pass over a step's micro-batches produced.

    `sums` are reduced over the data-parallel ranks and are only set on the last pipeline stage; `pairs` are this
    rank's micro-batches' per-pair values (last stage only, when asked for). `moe_load_balancing_loss` is the
    router's load-balancing loss without its coefficient, summed over layers and averaged over micro-batches and
    data-parallel ranks (MoE models in training only).
    """

    sums: ORPOMetricSums | None
    pairs: list[PairValues]
    moe_load_balancing_loss: float | None = None


def router_padding_mask(batch: MicroBatch, model_chunk: torch.nn.Module) -> torch.Tensor:
    """True at padding positions, so the MoE router leaves them out of its load-balancing loss (as HF does).

    GPTModel splits the mask for sequence parallelism only on the first pipeline stage; later stages get their
    TP rank's sequence slice here.
    """
    padding = batch["attention_mask"] == 0
    module = getattr(model_chunk, "module", model_chunk)
    if module.config.sequence_parallel and not module.pre_process:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        padding = padding.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=1)[tp_rank]
    return padding


def _forward_step(orpo_config: ORPOConfig, normalizers: GlobalNormalizers | None, loss_scale: float,
                  data_iterator, model_chunk):
    """Causal attention only: with right padding no real position sees padding, so no attention mask is built.
    (TRL also masks padding keys; that changes only padding positions' logits, i.e. TRL's `logits/*` metric.)"""
    batch = next(data_iterator)
    output = model_chunk(batch["input_ids"], batch["position_ids"], attention_mask=None,
                         padding_mask=router_padding_mask(batch, model_chunk))
    return output, partial(_loss_func, orpo_config, normalizers, loss_scale, batch)


def _loss_func(orpo_config: ORPOConfig, normalizers: GlobalNormalizers | None, loss_scale: float,
               batch: MicroBatch, vocab_parallel_logits: torch.Tensor):
    result = orpo_loss(vocab_parallel_logits, batch, orpo_config, normalizers)
    # Megatron divides each micro-batch's loss by the number of micro-batches and DDP averages gradients over
    # DP ranks; our loss is already normalized by the global batch's counts, so undo both.
    return result.loss * loss_scale, {"sums": result.sums, "pairs": result.pairs}


def pad_to_length(batch: MicroBatch, length: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to `length` positions; the new positions are masked everywhere (token id 0)."""
    extra = length - batch["input_ids"].shape[1]
    if extra == 0:
        return dict(batch)
    padded = dict(batch)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=0)
    rows = batch["input_ids"].shape[0]
    padded["position_ids"] = torch.arange(length, dtype=torch.long).repeat(rows, 1)
    return padded


def _same_shape_groups(micro_batches: list[MicroBatch]) -> list[list[dict[str, torch.Tensor]]]:
    """Consecutive micro-batches with the same number of rows, each group padded to its longest sequence.

    Pipeline stages exchange activations of the shape given to the schedule; Megatron's variable-shape mode
    deadlocks in the interleaved schedule on gloo and rules out the allgather dispatcher, so shapes are made
    uniform instead. Training steps are one group; an evaluation set may end with a smaller micro-batch.
    """
    groups: list[list[MicroBatch]] = []
    for batch in micro_batches:
        if groups and groups[-1][0]["input_ids"].shape[0] == batch["input_ids"].shape[0]:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return [[pad_to_length(b, max(x["input_ids"].shape[1] for x in group)) for b in group] for group in groups]


def run_micro_batches(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    orpo_config: ORPOConfig,
    forward_only: bool,
    collect_pairs: bool = False,
) -> ScheduleResult:
    """Forward (and backward unless `forward_only`) of this rank's micro-batches of one step.

    Training normalizes by the counts of the whole global batch (one all-reduce over DP), so the loss and the
    gradients do not depend on the parallel layout or on the micro-batch split.
    """
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = parallel_state.get_data_parallel_world_size()
    normalizers = None
    if not forward_only:
        normalizers = GlobalNormalizers.of_micro_batches(micro_batches, orpo_config.nll_on_prompt, dp_group)
        moe_utils.clear_aux_losses_tracker()
    outputs = []
    for group in _same_shape_groups(micro_batches):
        # The interleaved schedule reads one iterator per model chunk.
        iterators = [iter(group) for _ in model_chunks]
        outputs += get_forward_backward_func()(
            forward_step_func=partial(_forward_step, orpo_config, normalizers, float(len(group) * dp_size)),
            data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
            model=model_chunks,
            num_microbatches=len(group),
            seq_length=group[0]["input_ids"].shape[1],
            micro_batch_size=group[0]["input_ids"].shape[0],
            forward_only=forward_only,
        )
    sums, pairs = None, []
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        sums = ORPOMetricSums.zeros()
        for output in outputs:
            sums = sums + output["sums"]
            if collect_pairs:
                pairs.append(output["pairs"])
        sums = sums.all_reduce(dp_group)
    return ScheduleResult(sums, pairs, None if forward_only else _moe_load_balancing_loss(len(micro_batches)))


def _moe_load_balancing_loss(num_micro_batches: int) -> float | None:
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return None
    moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    return float(tracker["load_balancing_loss"]["values"].sum()) / num_micro_batches
