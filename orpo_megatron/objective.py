"""The ORPO objective over vocab-parallel logits: per-token log-probs, sequence log-probs, odds ratio, loss, metrics;
and TRL's CPO family of reference-free losses (sigmoid, hinge, ipo, simpo) over the same sequence log-probs.

Owns everything between the last pipeline stage's logits [R, S, V/TP] of a micro-batch (`data/micro_batch.py`,
padded or packed) and a scalar loss: vocab-parallel log-softmax (never gathering the vocabulary), per-sequence
sums over the batch's target masks, the NLL and odds-ratio terms, their normalization over the global batch,
TRL-named metrics as reducible sums, and per-pair values for the evaluator; and the host-side check of a
micro-batch's contract, run before it moves to the accelerator. It does not run the model, build batches, reduce
across data-parallel ranks on its own, or add the MoE aux loss (Megatron's router does).

Nothing here reads a device value back to the host (no `.item()`, boolean indexing or `.tolist()`): a micro-batch's
loss and metrics stay tensors until the caller turns them into numbers.

Normalization (differs from TRL on purpose): TRL's loss is, per micro-batch, the token-mean NLL of that
micro-batch plus beta times the pair-mean OR term, and gradient accumulation then averages those micro-batch
losses. Here a micro-batch contributes `nll_sum / global_nll_tokens + beta * or_sum / global_pairs`, where the
global counts cover every micro-batch on every DP rank of the step (`GlobalNormalizers`). Summed over
micro-batches and DP ranks, this is exactly the token-mean NLL and pair-mean OR of the whole global batch, so the
loss and gradients do not depend on how the batch is split. For one micro-batch on one rank both coincide.
Metrics follow the same rule: `ORPOMetricSums` holds sums and counts, reduced once and then divided.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility

from orpo_megatron.data.micro_batch import MicroBatch
from orpo_megatron.errors import ConfigError, DataError

# Branch point of log1mexp: below -ln 2, 1 - exp(x) is not close to 0 and log1p is exact; above it expm1 is.
_MINUS_LN2 = -math.log(2.0)


class ObjectiveInputError(DataError):
    """A micro-batch the objective cannot score (a token outside the model's vocabulary: a tokenizer that does not
    match the model), naming the source row and what was expected."""


LOSS_TYPES = ("orpo", "sigmoid", "hinge", "ipo", "simpo")
# TRL scores a sequence by its mean completion log-prob for these losses, by the sum for the others.
_AVERAGED_LOSS_TYPES = ("orpo", "ipo", "simpo")


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
    """What the objective needs beyond the batch.

    vocab_size: the tokenizer's true vocabulary; logits columns at or above it are the padding rows of the
        output layer and never enter a softmax.
    loss_type: `orpo` (NLL + beta * odds-ratio term) or one of TRL's CPO family (`trl.experimental.cpo`):
        `sigmoid` (CPO), `hinge`, `ipo`, `simpo`, each `cpo_alpha` * NLL + the mean pair term.
    beta: ORPO's odds-ratio weight (TRL ORPOConfig's `beta`, the paper's lambda), or the CPO family's
        temperature (TRL CPOConfig's `beta`; IPO's tau); scales the rewards/* metrics; default 0.1 for all.
    nll_on_prompt: NLL over prompt + completion targets (TRL's ORPO) or completion only (TRL's CPO); None picks
        what TRL does for `loss_type`.
    cpo_alpha: the CPO family's NLL weight (TRL's `cpo_alpha`; 0 gives pure SimPO); None: TRL's 1.0.
    simpo_gamma: SimPO's target reward margin (TRL's `simpo_gamma`); None: TRL's 0.5.
    label_smoothing: TRL's conservative-label weight, for `sigmoid` and `simpo`.
    """

    vocab_size: int
    beta: float = 0.1
    nll_on_prompt: bool | None = None
    loss_type: str = "orpo"
    cpo_alpha: float | None = None
    simpo_gamma: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.vocab_size < 1:
            raise ValueError(f"ORPOConfig.vocab_size must be >= 1, got {self.vocab_size}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        orpo = self.loss_type == "orpo"
        # Beta divides the margin in IPO and SimPO, and a CPO temperature of 0 leaves a constant loss.
        if not math.isfinite(self.beta) or self.beta < 0 or (self.beta == 0 and not orpo):
            raise ConfigError(f"--beta must be a finite number {'>= 0' if orpo else '> 0'} for --loss-type "
                             f"{self.loss_type}, got {self.beta}")
        # A flag the chosen loss ignores would make a silently wrong run.
        if orpo and self.cpo_alpha is not None:
            raise ConfigError("--cpo-alpha applies to the CPO losses (sigmoid, hinge, ipo, simpo); ORPO's NLL weight "
                             "is 1")
        if self.loss_type != "simpo" and self.simpo_gamma is not None:
            raise ConfigError(f"--simpo-gamma applies to --loss-type simpo only, got --loss-type {self.loss_type}")
        if self.label_smoothing != 0 and self.loss_type not in ("sigmoid", "simpo"):
            raise ConfigError(f"--label-smoothing applies to --loss-type sigmoid and simpo only, got --loss-type "
                             f"{self.loss_type}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not orpo and self.cpo_alpha is None:
            object.__setattr__(self, "cpo_alpha", 1.0)
        if self.loss_type == "simpo" and self.simpo_gamma is None:
            object.__setattr__(self, "simpo_gamma", 0.5)
        if self.cpo_alpha is not None and (not math.isfinite(self.cpo_alpha) or self.cpo_alpha < 0):
            raise ConfigError(f"--cpo-alpha must be a finite number >= 0, got {self.cpo_alpha}")
        if self.simpo_gamma is not None and not math.isfinite(self.simpo_gamma):
            raise ConfigError(f"--simpo-gamma must be a finite number, got {self.simpo_gamma}")
        if self.nll_on_prompt is None:
            object.__setattr__(self, "nll_on_prompt", orpo)

    @classmethod
    def from_args(cls, args, vocab_size: int) -> "ORPOConfig":
        """The objective that the flags of `arguments.add_objective_args` ask for."""
        return cls(vocab_size=vocab_size, beta=args.beta, nll_on_prompt=args.nll_on_prompt, loss_type=args.loss_type,
                   cpo_alpha=args.cpo_alpha, simpo_gamma=args.simpo_gamma, label_smoothing=args.label_smoothing)

    @property
    def averages_log_probs(self) -> bool:
        """Whether a sequence scores its mean completion log-prob (else the sum), as TRL does per loss type."""
        return self.loss_type in _AVERAGED_LOSS_TYPES

    @property
    def nll_weight(self) -> float:
        return 1.0 if self.loss_type == "orpo" else self.cpo_alpha

    @property
    def pair_weight(self) -> float:
        """ORPO weighs its pair term by beta; the CPO family has beta inside the term."""
        return self.beta if self.loss_type == "orpo" else 1.0


# --------------------------------------------------------------------------------------- host-side check


def check_micro_batch(batch: MicroBatch, vocab_size: int) -> None:
    """Raise ObjectiveInputError unless a host micro-batch follows the contract the loss relies on, naming the
    source row. Runs on the host before the batch moves to the accelerator, so it never waits on the device."""
    shape = batch.input_ids.shape
    num_sequences = len(batch.sequence_lengths)
    if batch.input_ids.dim() != 2 or shape[1] < 2 or num_sequences < 2 or num_sequences % 2:
        raise ObjectiveInputError(f"a micro-batch needs [R, S >= 2] input_ids and an even number of sequences, got "
                                  f"{tuple(shape)} and {num_sequences}")
    for name in ("position_ids", "labels", "sequence_index", "real_targets", "completion_targets",
                 "logits_positions", "padding_mask"):
        if getattr(batch, name).shape != shape:
            raise ObjectiveInputError(f"{name} has shape {tuple(getattr(batch, name).shape)}, input_ids {tuple(shape)}")

    def source(position: torch.Tensor) -> str:
        sequence = int(batch.sequence_index.reshape(-1)[position])
        pairs = batch.num_pairs
        return (f"source row {int(batch.row_index[sequence % pairs])} "
                f"({'chosen' if sequence < pairs else 'rejected'} sequence)")

    outside = (~batch.padding_mask & ((batch.input_ids < 0) | (batch.input_ids >= vocab_size))).reshape(-1)
    if outside.any():
        position = outside.nonzero()[0, 0]
        raise ObjectiveInputError(f"{source(position)} holds token id {int(batch.input_ids.reshape(-1)[position])}, "
                                  f"outside the vocabulary [0, {vocab_size})")
    targets = torch.bincount(batch.sequence_index[batch.completion_targets], minlength=num_sequences)
    if (targets == 0).any():
        sequence = int((targets == 0).nonzero()[0, 0])
        position = (batch.sequence_index.reshape(-1) == sequence).nonzero()[0, 0]
        raise ObjectiveInputError(f"{source(position)} has no completion token after its first position; the data "
                                  "layer must drop pairs whose completion is empty after truncation")
    if batch.packed and (batch.cu_seqlens[-1] != shape[1] or batch.max_seqlen >= shape[1]):
        # With max_seqlen == T Megatron's THD RoPE maps positions by offset instead of restarting them.
        raise ObjectiveInputError(f"packed row of {shape[1]} positions has cu_seqlens ending at "
                                  f"{int(batch.cu_seqlens[-1])} and max_seqlen {batch.max_seqlen}; expected the row "
                                  "length and a longest segment shorter than it")


# ------------------------------------------------------------------------- vocab-parallel log-probabilities


def _true_columns_in_partition(
    partition_vocab_size: int, rank: int, world_size: int, vocab_size: int
) -> tuple[int, int]:
    """(first global column of this rank, how many of its columns are real tokens rather than padding)."""
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab_size, rank, world_size)
    return start, max(0, min(end, vocab_size) - start)


def _true_logits_max(logits: torch.Tensor, num_true: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position max over this rank's real columns in fp32 (-inf when the rank holds only padding), and where."""
    if num_true == 0:
        shape = logits.shape[:-1]
        return (torch.full(shape, -math.inf, dtype=torch.float32, device=logits.device),
                torch.zeros(shape, dtype=torch.long, device=logits.device))
    values, columns = logits[..., :num_true].max(dim=-1)
    return values.float(), columns


def _shifted_fp32_logits(logits: torch.Tensor, logits_max: torch.Tensor, num_true: int) -> torch.Tensor:
    """fp32 copy of logits - max with padding columns at -inf, so they add exp(-inf) = 0 to the softmax.

    A fresh buffer: the caller's logits stay intact (the logits metrics read them) and bf16 logits are upcast
    once, here.
    """
    shifted = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    shifted.sub_(logits_max.unsqueeze(-1))
    shifted[..., num_true:] = -math.inf
    return shifted


def _owned_target_logits(
    shifted: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_end: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's shifted logit where this rank owns the target column, else 0 (summed over ranks later)."""
    not_owned = (target < vocab_start) | (target >= vocab_end)
    local_target = (target - vocab_start).masked_fill(not_owned, 0).reshape(-1)
    rows = torch.arange(local_target.numel(), device=shifted.device)
    picked = shifted.reshape(-1, shifted.shape[-1])[rows, local_target].view_as(target)
    return picked.masked_fill(not_owned, 0.0), not_owned, local_target


def _sum_exp_without_max(
    exp_logits: torch.Tensor, local_max: torch.Tensor, global_max: torch.Tensor, local_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of this rank's exp(shifted logits) leaving out one column holding the global max, and whether it did.

    The left-out column holds exp(0) = 1 exactly; every position's argmax column is zeroed where it holds the
    global max and restored after the sum (fixed shapes: no boolean indexing, which would wait on the device).
    """
    holds_max = (local_max == global_max).reshape(-1, 1)
    exp_2d = exp_logits.view(-1, exp_logits.shape[-1])
    columns = local_argmax.reshape(-1, 1)
    at_argmax = exp_2d.gather(1, columns)
    exp_2d.scatter_(1, columns, at_argmax.masked_fill(holds_max, 0.0))
    sum_other_exp = exp_logits.sum(dim=-1)
    exp_2d.scatter_(1, columns, at_argmax)
    return sum_other_exp, holds_max.view_as(local_max).float()


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelTokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[target] over a vocabulary split across the TP group, in fp32.

    Backward: d logp / d logit_j = 1[j = target] - softmax_j, computed from the saved local softmax shard; no
    communication is needed because every TP rank holds the same downstream loss. As in Megatron's cross
    entropy, the gradient is written into the saved softmax buffer, so the graph supports one backward.
    """

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size, group):
        rank = dist.get_rank(group) if group is not None else 0
        world_size = dist.get_world_size(group) if group is not None else 1
        partition_vocab_size = vocab_parallel_logits.shape[-1]
        vocab_start, num_true = _true_columns_in_partition(partition_vocab_size, rank, world_size, vocab_size)

        local_max, local_argmax = _true_logits_max(vocab_parallel_logits, num_true)
        logits_max = local_max.clone()
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)
        shifted = _shifted_fp32_logits(vocab_parallel_logits, logits_max, num_true)
        target_logits, not_owned, local_target = _owned_target_logits(
            shifted, target, vocab_start, vocab_start + num_true
        )

        # In place: the shifted logits are not needed once exponentiated, and the buffer becomes the softmax.
        exp_logits = shifted.exp_()
        sum_other_exp, holds_max = _sum_exp_without_max(exp_logits, local_max, logits_max, local_argmax)
        # One collective for all partial sums.
        partial_sums = torch.stack([target_logits, sum_other_exp, holds_max])
        _all_reduce(partial_sums, dist.ReduceOp.SUM, group)
        target_logits, sum_other_exp, ranks_holding_max = partial_sums
        # Every rank left out its own copy of exp(0) = 1; only one is the max term, the others belong to the sum.
        sum_other_exp += ranks_holding_max - 1
        # log(sum exp) = log1p(sum of the non-max terms): keeps fp32 relative precision for log-probs near 0
        # (a near-certain token), where log(1 + tiny) would round to exactly 0.
        token_logps = target_logits - torch.log1p(sum_other_exp)

        softmax = exp_logits.div_((1 + sum_other_exp).unsqueeze(-1))
        ctx.save_for_backward(softmax, not_owned, local_target)
        ctx.input_dtype = vocab_parallel_logits.dtype
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        softmax, not_owned, local_target = ctx.saved_tensors
        grad_logits = softmax.mul_(-grad_token_logps.unsqueeze(-1))
        grad_2d = grad_logits.view(-1, grad_logits.shape[-1])
        rows = torch.arange(grad_2d.shape[0], device=grad_2d.device)
        grad_2d[rows, local_target] += grad_token_logps.reshape(-1).masked_fill(not_owned.reshape(-1), 0.0)
        return grad_logits.to(ctx.input_dtype), None, None, None


def default_tp_group():
    """Megatron's tensor-parallel group once parallel state exists, else None (one process, whole vocabulary)."""
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def vocab_parallel_logps(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, vocab_size: int, tp_group=None
) -> torch.Tensor:
    """fp32 log-prob of `target` [R, S] under vocab-parallel logits [R, S, V/TP]; padding columns excluded.

    `tp_group=None` uses Megatron's tensor-parallel group (or a single rank without parallel state).
    """
    group = default_tp_group() if tp_group is None else tp_group
    return _VocabParallelTokenLogProbs.apply(vocab_parallel_logits, target, vocab_size, group)


# ------------------------------------------------------------------------------ sequence terms and ORPO


def sequence_membership(sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[num_sequences, positions] bool: which flattened positions belong to each sequence (either layout)."""
    sequences = torch.arange(num_sequences, device=sequence_index.device)
    return sequence_index.reshape(1, -1) == sequences[:, None]


def per_sequence_sums(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Sum of `values` ([R, S]) over each row of `members` ([n, R*S] bool)."""
    # where, not a product: a -inf log-prob on a masked position must not turn into NaN.
    return torch.where(members, values.reshape(1, -1), 0.0).sum(dim=-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range.

    Each branch gets an input from its own side of -ln 2 so the discarded branch stays finite and cannot put a
    NaN into the gradient through torch.where (0 * inf).
    """
    near_zero = x > _MINUS_LN2
    x_near_zero = torch.where(near_zero, x, _MINUS_LN2)
    x_far = torch.where(near_zero, 2 * _MINUS_LN2, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near_zero)), torch.log1p(-torch.exp(x_far)))


def odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair log odds ratio and OR loss -logsigmoid(log odds), in fp32.

    log odds = log[(P_c / (1 - P_c)) / (P_r / (1 - P_r))] with P = exp(mean-token logp).
    """
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    # A mean logp of exactly 0 (P = 1 to fp32 precision) makes log1mexp -inf and its gradient NaN; capping at
    # -tiny leaves every other fp32 value unchanged and gives a finite, saturated log odds instead.
    tiny = torch.finfo(torch.float32).tiny
    chosen, rejected = chosen.clamp(max=-tiny), rejected.clamp(max=-tiny)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return log_odds, -F.logsigmoid(log_odds)


def cpo_family_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, config: ORPOConfig) -> torch.Tensor:
    """Per-pair pair term of TRL's `CPOTrainer.cpo_loss` (without AlphaPO's reward shaping), in fp32.

    With the margin m = chosen - rejected log-prob (sums for sigmoid and hinge, means for ipo and simpo), and
    eps = label_smoothing:
      sigmoid: -(1 - eps) logsigmoid(beta m) - eps logsigmoid(-beta m)
      simpo:   the same with m - gamma / beta, i.e. beta m - gamma inside the logsigmoid
      hinge:   relu(1 - beta m)
      ipo:     (m - 1 / (2 beta))^2
    """
    margin = chosen_logps.float() - rejected_logps.float()
    beta, smoothing = config.beta, config.label_smoothing
    if config.loss_type == "simpo":
        margin = margin - config.simpo_gamma / beta
    if config.loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
    if config.loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if config.loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"not a CPO-family loss type: {config.loss_type!r}")


# -------------------------------------------------------------------------------- normalization and metrics


@dataclasses.dataclass(frozen=True)
class GlobalNormalizers:
    """Denominators of the global-batch loss: all pairs and all chosen NLL targets of the step (host numbers,
    e.g. from the data iterator, which knows the whole global batch)."""

    num_pairs: int
    num_nll_tokens: int

    def __post_init__(self):
        if self.num_pairs < 1 or self.num_nll_tokens < 1:
            raise ObjectiveInputError(
                f"a global batch needs >= 1 pair and >= 1 NLL target, got {self.num_pairs} pairs and "
                f"{self.num_nll_tokens} targets"
            )

    @classmethod
    def of_micro_batches(cls, micro_batches: Iterable[MicroBatch], nll_on_prompt: bool = True) -> "GlobalNormalizers":
        """The counts of these micro-batches (from their host values)."""
        micro_batches = list(micro_batches)
        return cls(sum(b.num_pairs for b in micro_batches),
                   sum(b.num_nll_targets(nll_on_prompt) for b in micro_batches))


@dataclasses.dataclass
class ORPOMetricSums:
    """Sums and counts behind every TRL metric, for any set of micro-batches: total, all-reduce once, finalize.

    0-d float64 tensors, so accumulating over micro-batches needs no host sync and counts stay exact.
    """

    num_pairs: torch.Tensor
    num_nll_tokens: torch.Tensor
    nll_sum: torch.Tensor
    chosen_logps_sum: torch.Tensor
    rejected_logps_sum: torch.Tensor
    chosen_reward_wins: torch.Tensor  # pairs with beta * chosen > beta * rejected (TRL's accuracy)
    log_odds_sum: torch.Tensor  # ORPO only (0 for the CPO family)
    pair_loss_sum: torch.Tensor  # the per-pair term: ORPO's -logsigmoid(log odds), or the CPO family's
    chosen_logits_sum: torch.Tensor
    rejected_logits_sum: torch.Tensor
    chosen_logits_count: torch.Tensor  # positions x true vocab columns the chosen logits sum covers
    rejected_logits_count: torch.Tensor

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "ORPOMetricSums":
        return cls(*values.unbind())

    def to_tensor(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])

    @classmethod
    def total(cls, parts: Iterable["ORPOMetricSums"]) -> "ORPOMetricSums":
        """The sums of several micro-batches (on their device)."""
        return cls.from_tensor(torch.stack([part.to_tensor() for part in parts]).sum(dim=0))

    def all_reduce(self, group=None) -> "ORPOMetricSums":
        """Sum over the ranks of `group` (the DP group of the last pipeline stage); one collective."""
        values = self.to_tensor().clone()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            if dist.get_backend(group) == "nccl":
                values = values.cuda()
            dist.all_reduce(values, group=group)
        return ORPOMetricSums.from_tensor(values)

    def finalize(self, config: ORPOConfig) -> dict[str, float]:
        """The metrics TRL's ORPOTrainer or CPOTrainer logs for `config.loss_type`, as global-batch means; `loss`
        is the global-batch loss (without the MoE aux loss). Reads the sums back to the host once."""
        sums = ORPOMetricSums(*self.to_tensor().tolist())
        pairs, beta = sums.num_pairs, config.beta
        nll_loss = sums.nll_sum / sums.num_nll_tokens
        chosen_logps = sums.chosen_logps_sum / pairs
        rejected_logps = sums.rejected_logps_sum / pairs
        pair_loss = sums.pair_loss_sum / pairs
        metrics = {
            "loss": config.nll_weight * nll_loss + config.pair_weight * pair_loss,
            "rewards/chosen": beta * chosen_logps,
            "rewards/rejected": beta * rejected_logps,
            "rewards/accuracies": sums.chosen_reward_wins / pairs,
            "rewards/margins": beta * (chosen_logps - rejected_logps),
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
            "logits/chosen": sums.chosen_logits_sum / sums.chosen_logits_count,
            "logits/rejected": sums.rejected_logits_sum / sums.rejected_logits_count,
            # TRL's CPOTrainer computes no NLL when cpo_alpha is 0 and logs 0.
            "nll_loss": nll_loss if config.nll_weight else 0.0,
        }
        if config.loss_type == "orpo":
            metrics["log_odds_ratio"] = -pair_loss
            metrics["log_odds_chosen"] = sums.log_odds_sum / pairs
        return metrics


@torch.no_grad()
def vocab_parallel_logits_sums(
    vocab_parallel_logits: torch.Tensor, batch: MicroBatch, vocab_size: int, tp_group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of raw logits over the chosen and the rejected sequences' `logits_positions`, and their counts.

    TRL averages `logits[:, :-1]` of the batch padded to its longest real row, padding positions included, over
    the true vocabulary; the padded layout marks exactly those positions. A packed row has no padding positions
    between sequences to average, so there the metric covers every position with a real target. Each position's
    shard is summed in fp32 (no upcast copy of the logits), positions in float64.
    """
    group = default_tp_group() if tp_group is None else tp_group
    rank = dist.get_rank(group) if group is not None else 0
    world_size = dist.get_world_size(group) if group is not None else 1
    _, num_true = _true_columns_in_partition(vocab_parallel_logits.shape[-1], rank, world_size, vocab_size)
    position_sums = vocab_parallel_logits[..., :num_true].sum(dim=-1, dtype=torch.float32).double()
    chosen = batch.sequence_index < batch.num_pairs
    halves = torch.stack([batch.logits_positions & chosen, batch.logits_positions & ~chosen])
    sums = torch.where(halves, position_sums, 0.0).sum(dim=(1, 2))
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    counts = halves.sum(dim=(1, 2)).double() * vocab_size
    return sums[0], sums[1], counts[0], counts[1]


# ------------------------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class PairValues:
    """Per-pair values of one micro-batch (detached, fp32), e.g. one evaluator JSON line per pair."""

    chosen_logps: torch.Tensor  # mean or summed completion log-prob, as the loss type scores sequences
    rejected_logps: torch.Tensor
    log_odds: torch.Tensor | None  # ORPO only
    pair_loss: torch.Tensor  # the per-pair term of the loss (before its weight)
    chosen_nll: torch.Tensor  # token-mean NLL of the chosen row over its NLL targets

    @property
    def chosen_wins(self) -> torch.Tensor:
        return self.chosen_logps > self.rejected_logps


@dataclasses.dataclass(frozen=True)
class ORPOOutput:
    """`loss`: this micro-batch's differentiable share of the global-batch loss. `pairs`, `sums`: see above."""

    loss: torch.Tensor
    pairs: PairValues
    sums: ORPOMetricSums


def orpo_loss(
    vocab_parallel_logits: torch.Tensor,
    batch: MicroBatch,
    config: ORPOConfig,
    normalizers: GlobalNormalizers | None = None,
    tp_group=None,
) -> ORPOOutput:
    """The loss share (ORPO or a CPO-family loss, per `config.loss_type`) of one micro-batch of B pairs, from its
    logits [R, S, V/TP] (either layout).

    loss = nll_weight * nll_sum / normalizers.num_nll_tokens + pair_weight * pair_sum / normalizers.num_pairs,
    with ORPO's weights 1 and beta, the CPO family's cpo_alpha and 1 (`ORPOConfig`). Summing it over every
    micro-batch and DP rank of a step gives the global-batch loss. `normalizers=None` normalizes by this
    micro-batch alone (TRL's per-micro-batch loss, e.g. for evaluation). The batch must already be checked
    (`check_micro_batch`) and on the logits' device.
    """
    num_pairs = batch.num_pairs
    token_logps = vocab_parallel_logps(vocab_parallel_logits, batch.labels, config.vocab_size, tp_group)
    membership = sequence_membership(batch.sequence_index, 2 * num_pairs)
    completion = membership & batch.completion_targets.reshape(1, -1)
    logps = per_sequence_sums(token_logps, completion)
    if config.averages_log_probs:
        logps = logps / completion.sum(dim=-1)
    chosen_logps, rejected_logps = logps[:num_pairs], logps[num_pairs:]
    nll_targets = batch.real_targets if config.nll_on_prompt else batch.completion_targets
    nll = membership[:num_pairs] & nll_targets.reshape(1, -1)
    nll_sums, nll_counts = -per_sequence_sums(token_logps, nll), nll.sum(dim=-1)
    if config.loss_type == "orpo":
        log_odds, pair_losses = odds_ratio(chosen_logps, rejected_logps)
    else:
        log_odds, pair_losses = None, cpo_family_loss(chosen_logps, rejected_logps, config)
    if normalizers is None:
        nll_tokens, all_pairs = nll_counts.sum(), num_pairs
    else:
        nll_tokens, all_pairs = normalizers.num_nll_tokens, normalizers.num_pairs
    loss = config.nll_weight * nll_sums.sum() / nll_tokens + config.pair_weight * pair_losses.sum() / all_pairs

    with torch.no_grad():
        chosen_logits_sum, rejected_logits_sum, chosen_logits_count, rejected_logits_count = (
            vocab_parallel_logits_sums(vocab_parallel_logits, batch, config.vocab_size, tp_group))
        sums = ORPOMetricSums(
            num_pairs=torch.full((), float(num_pairs), dtype=torch.float64, device=logps.device),
            num_nll_tokens=nll_counts.sum().double(),
            nll_sum=nll_sums.sum().double(),
            chosen_logps_sum=chosen_logps.sum().double(),
            rejected_logps_sum=rejected_logps.sum().double(),
            chosen_reward_wins=(config.beta * chosen_logps > config.beta * rejected_logps).sum().double(),
            log_odds_sum=(log_odds.sum() if log_odds is not None else torch.zeros((), device=logps.device)).double(),
            pair_loss_sum=pair_losses.sum().double(),
            chosen_logits_sum=chosen_logits_sum,
            rejected_logits_sum=rejected_logits_sum,
            chosen_logits_count=chosen_logits_count,
            rejected_logits_count=rejected_logits_count,
        )
        pairs = PairValues(
            chosen_logps=chosen_logps.detach(),
            rejected_logps=rejected_logps.detach(),
            log_odds=log_odds.detach() if log_odds is not None else None,
            pair_loss=pair_losses.detach(),
            chosen_nll=nll_sums.detach() / nll_counts,
        )
    return ORPOOutput(loss=loss, pairs=pairs, sums=sums)
