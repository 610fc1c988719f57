"""The micro-batch: the tensors one forward/backward of ORPO reads, in a padded or a packed layout.

A micro-batch holds B pairs, i.e. 2B sequences (prompt + chosen completion, prompt + rejected completion)
numbered in *loss order*: sequences 0..B-1 are the chosen ones, B..2B-1 the rejected ones of the same pairs.
- Packed (the default): one row of T positions holding the 2B sequences back to back in loss order, with no
  padding between them. Positions restart at 0 with every sequence and `cu_seqlens` marks the boundaries, so
  attention stays inside each sequence (THD on the TE spec, a block-diagonal causal mask on the local spec).
  T is rounded up to the length multiple by padding after the last sequence; that tail belongs to the last
  segment of `cu_seqlens` (it comes after every real token, so causal attention keeps it out of real positions),
  which leaves no segment empty and the longest segment shorter than T (Megatron's THD RoPE would otherwise
  switch to offset positions).
- Padded (`--no-packing`): 2B rows of S positions, row r holding sequence r right-padded; causal attention.

Tensors, [R, S] unless noted (R = 1 packed, 2B padded), built on the host and moved to the accelerator once per
micro-batch by `to_device`:
  input_ids, position_ids    model inputs (RoPE itself follows `cu_seqlens`, not position_ids)
  labels                     the next token of the same sequence, 0 where there is none
  sequence_index             loss-order number of the sequence a position belongs to (padding: its row's or the
                             last sequence's)
  real_targets               the label is a real token of the same sequence (the NLL term with the prompt)
  completion_targets         the label is a completion token (sequence log-probs; NLL without the prompt)
  logits_positions           positions TRL's `logits/*` metrics average (padded: TRL's batch positions
                             0..longest-2, padding included; packed: every position with a real target)
  padding_mask               True on padding, which the MoE router leaves out of its statistics
  cu_seqlens                 [2B + 1] int32 segment boundaries; packed only, else None
Host values (never moved): max_seqlen (packed), num_pairs, row_index [B] (source row numbers), sequence_lengths
(real tokens per sequence, loss order) and the counts of chosen NLL targets that normalize the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from orpo_megatron.errors import ConfigError

DEVICE_FIELDS = ("input_ids", "position_ids", "labels", "sequence_index", "real_targets", "completion_targets",
                 "logits_positions", "padding_mask", "cu_seqlens")


def round_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple` (ints, or numpy arrays of them)."""
    return -(-value // multiple) * multiple


def pair_target_counts(prompt_length, chosen_length):
    """(real, completion) targets of a chosen sequence (ints or numpy arrays of them): every token but the first
    is a target, and every completion token is one unless it is the sequence's first token (an empty prompt)."""
    return prompt_length + chosen_length - 1, chosen_length - (prompt_length == 0)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """See the module docstring for every field."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    sequence_index: torch.Tensor
    real_targets: torch.Tensor
    completion_targets: torch.Tensor
    logits_positions: torch.Tensor
    padding_mask: torch.Tensor
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    row_index: torch.Tensor
    sequence_lengths: tuple[int, ...]
    num_chosen_real_targets: int
    num_chosen_completion_targets: int

    @property
    def num_pairs(self) -> int:
        return len(self.sequence_lengths) // 2

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_positions(self) -> int:
        """Positions the model computes (real tokens and padding)."""
        return self.input_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        return sum(self.sequence_lengths)

    def num_nll_targets(self, nll_on_prompt: bool) -> int:
        return self.num_chosen_real_targets if nll_on_prompt else self.num_chosen_completion_targets

    def to_device(self, device: torch.device | None) -> MicroBatch:
        """The same micro-batch with its model and loss tensors on `device` (None: unchanged, e.g. on CPU).

        From pinned host memory with non-blocking copies on CUDA: the copies queue behind the running work instead
        of waiting for it. Host values and `row_index` stay on the host.
        """
        if device is None:
            return self
        pin = device.type == "cuda"

        def move(tensor):
            if tensor is None:
                return None
            return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=pin)

        return dataclasses.replace(self, **{name: move(getattr(self, name)) for name in DEVICE_FIELDS})

    def padded_to(self, length: int) -> MicroBatch:
        """This micro-batch with every row extended to `length` positions of padding (token id 0, no targets).

        Packed rows give the new positions to the last segment, so they stay after every real token.
        """
        extra = length - self.input_ids.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad a micro-batch of {self.input_ids.shape[1]} positions to {length}")
        if extra == 0:
            return self

        def pad(tensor, value):
            return torch.nn.functional.pad(tensor, (0, extra), value=value)

        last = self.sequence_index[:, -1:]
        continued = self.position_ids[:, -1:] + torch.arange(1, extra + 1)
        changes = dict(
            input_ids=pad(self.input_ids, 0), labels=pad(self.labels, 0),
            position_ids=torch.cat([self.position_ids, continued], dim=1),
            sequence_index=torch.cat([self.sequence_index, last.expand(-1, extra)], dim=1),
            real_targets=pad(self.real_targets, False), completion_targets=pad(self.completion_targets, False),
            logits_positions=pad(self.logits_positions, False), padding_mask=pad(self.padding_mask, True),
        )
        if self.packed:
            cu_seqlens = self.cu_seqlens.clone()
            cu_seqlens[-1] = length
            changes.update(cu_seqlens=cu_seqlens, max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        return dataclasses.replace(self, **changes)


def _sequences(pairs: dict[str, list]) -> tuple[list[list[int]], list[int]]:
    """The 2B token sequences of the pairs in loss order, and each one's prompt length."""
    prompts = pairs["prompt_input_ids"]
    sequences = ([list(p) + list(c) for p, c in zip(prompts, pairs["chosen_input_ids"])]
                 + [list(p) + list(r) for p, r in zip(prompts, pairs["rejected_input_ids"])])
    return sequences, [len(p) for p in prompts] * 2


def _shift_left(tensor: torch.Tensor, fill) -> torch.Tensor:
    shifted = torch.full_like(tensor, fill)
    shifted[:, :-1] = tensor[:, 1:]
    return shifted


def _assemble(input_ids, is_real, is_completion, sequence_index, position_ids, logits_positions, cu_seqlens,
              max_seqlen, row_index, sequence_lengths) -> MicroBatch:
    """Targets from the unshifted masks: position t is scored on token t + 1 if it is real and of the same
    sequence. `logits_positions` None: every position with a target."""
    real_targets = _shift_left(is_real, False) & (_shift_left(sequence_index, -1) == sequence_index)
    completion_targets = real_targets & _shift_left(is_completion, False)
    num_pairs = len(sequence_lengths) // 2
    chosen = sequence_index < num_pairs
    return MicroBatch(
        input_ids=input_ids, position_ids=position_ids, labels=torch.where(real_targets, _shift_left(input_ids, 0), 0),
        sequence_index=sequence_index, real_targets=real_targets, completion_targets=completion_targets,
        logits_positions=real_targets if logits_positions is None else logits_positions, padding_mask=~is_real, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        row_index=torch.tensor(row_index, dtype=torch.long), sequence_lengths=tuple(sequence_lengths),
        num_chosen_real_targets=int((real_targets & chosen).sum()),
        num_chosen_completion_targets=int((completion_targets & chosen).sum()),
    )


def padded_micro_batch(pairs: dict[str, list], pad_id: int, length_multiple: int = 1) -> MicroBatch:
    """The padded layout of the pairs in columns `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`
    (completions) and `row_index`: 2B rows, S = the longest row rounded up to `length_multiple`."""
    sequences, prompt_lengths = _sequences(pairs)
    lengths = [len(s) for s in sequences]
    length = round_up(max(lengths), length_multiple)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    positions = torch.arange(length)
    is_real = positions < torch.tensor(lengths)[:, None]
    return padded_rows(input_ids, is_real, is_real & (positions >= torch.tensor(prompt_lengths)[:, None]),
                       pairs["row_index"])


def padded_rows(input_ids: torch.Tensor, is_real: torch.Tensor, is_completion: torch.Tensor,
                row_index: Sequence[int]) -> MicroBatch:
    """The padded layout from its rows: [2B, S] token ids, real-token mask (a prefix of each row) and
    completion-token mask, chosen rows first."""
    rows, length = input_ids.shape
    lengths = is_real.sum(dim=-1).tolist()
    positions = torch.arange(length).expand(rows, length)
    # TRL pads the batch to its longest row and averages logits[:, :-1] over every row.
    logits_positions = positions < max(lengths) - 1
    return _assemble(input_ids, is_real, is_completion, torch.arange(rows)[:, None].expand(rows, length).clone(),
                     positions.clone(), logits_positions, None, None, row_index, lengths)


def packed_micro_batch(pairs: dict[str, list], pad_id: int, length_multiple: int = 1,
                       length: int | None = None) -> MicroBatch:
    """The packed layout of the pairs (columns as in `padded_micro_batch`): one row of `length` positions,
    by default the real tokens rounded up to `length_multiple`."""
    sequences, prompt_lengths = _sequences(pairs)
    lengths = torch.tensor([len(s) for s in sequences])
    real = int(lengths.sum())
    length = round_up(real, length_multiple) if length is None else length
    if length < real:
        raise ConfigError(f"the {len(sequences) // 2} pairs of rows {list(pairs['row_index'])} hold {real} tokens, "
                         f"more than the row length {length}")
    input_ids = torch.full((1, length), pad_id, dtype=torch.long)
    input_ids[0, :real] = torch.cat([torch.tensor(sequence, dtype=torch.long) for sequence in sequences])
    starts = torch.cumsum(lengths, 0) - lengths
    sequence_index = torch.repeat_interleave(torch.arange(len(sequences)), lengths, output_size=real)
    sequence_index = torch.nn.functional.pad(sequence_index, (0, length - real), value=len(sequences) - 1)
    position_ids = torch.arange(length) - starts[sequence_index]
    is_real = torch.arange(length) < real
    is_completion = is_real & (position_ids >= torch.tensor(prompt_lengths)[sequence_index])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).to(torch.int32)])
    cu_seqlens[-1] = length
    segment_lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return _assemble(input_ids, is_real[None], is_completion[None], sequence_index[None], position_ids[None],
                     None, cu_seqlens, int(segment_lengths.max()), pairs["row_index"], lengths.tolist())

