"""The ORPO objective against independent references: TRL's formulas in plain float64 PyTorch, TRL itself,
mpmath for log1mexp, and the whole-vocabulary computation for the vocab-parallel (TP2) path.

The reference below follows TRL's ORPOTrainer step by step (labels with -100, logits[:, :-1], full log_softmax
over the true vocabulary, gather, CrossEntropyLoss for the NLL, the plain odds-ratio formula) on the batch cut to
its longest real row, as TRL's collator would pad it. It is computed in float64 from the same fp32 logits, so
each comparison measures our fp32 error.
"""
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from workers.trl_reference import CPO_CASES, cpo_reference, trl_padded_batch
from workers.trl_reference import trl_reference as workers_trl_reference
from orpo_megatron.data.micro_batch import MicroBatch, packed_micro_batch, padded_rows
from orpo_megatron.objective import (
    GlobalNormalizers,
    ObjectiveInputError,
    ORPOConfig,
    ORPOMetricSums,
    check_micro_batch,
    log1mexp,
    odds_ratio,
    orpo_loss,
)

TRUE_VOCAB, PADDED_VOCAB = 600, 768  # the tiny fixture's vocabulary, padded as at TP2
PAD_ID = 2  # EOS, the pad id of tokenizers without one
RTOL = 1e-5  # fp32 claims


# ------------------------------------------------------------------------------------------ inputs


def make_micro_batch(num_pairs: int, seq_len: int, seed: int, longest: int | None = None) -> dict:
    """Random pairs following the data contract; rows end at different lengths, the longest at `longest`."""
    gen = torch.Generator().manual_seed(seed)
    longest = seq_len if longest is None else longest
    rows = 2 * num_pairs
    prompt_len = torch.randint(2, 6, (num_pairs,), generator=gen).repeat(2)
    lengths = torch.stack(
        [torch.randint(int(p) + 1, longest + 1, (), generator=gen) for p in prompt_len]
    )
    lengths[torch.randint(0, rows, (), generator=gen)] = longest
    positions = torch.arange(seq_len).expand(rows, seq_len)
    attention = positions < lengths[:, None]
    completion = attention & (positions >= prompt_len[:, None])
    input_ids = torch.randint(3, TRUE_VOCAB, (rows, seq_len), generator=gen).masked_fill(~attention, PAD_ID)
    return {
        "input_ids": input_ids,
        "attention_mask": attention.long(),
        "completion_mask": completion,
        "position_ids": positions.clone(),
    }


def as_micro_batch(batch: dict, first_row: int = 100) -> MicroBatch:
    """Our micro-batch of a padded batch dict (rows chosen then rejected), checked as the pipeline does."""
    micro_batch = padded_rows(batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"],
                              list(range(first_row, first_row + batch["input_ids"].shape[0] // 2)))
    check_micro_batch(micro_batch, TRUE_VOCAB)
    return micro_batch


def make_logits(batch: dict, seed: int, padded_vocab: int = PADDED_VOCAB, pad_value: float = 0.0) -> torch.Tensor:
    """fp32 logits [2B, S, padded_vocab], nonzero mean; padding columns hold `pad_value`."""
    gen = torch.Generator().manual_seed(seed)
    rows, seq_len = batch["input_ids"].shape
    logits = torch.randn(rows, seq_len, padded_vocab, generator=gen) * 3 + 0.5
    # Make some targets likely so sequence logps span a range, not just ~ -log(V).
    boost = torch.rand(rows, seq_len, generator=gen) * 12
    targets = torch.roll(batch["input_ids"], -1, dims=1)
    logits.scatter_add_(2, targets[..., None], boost[..., None])
    logits[..., TRUE_VOCAB:] = pad_value
    return logits


# --------------------------------------------------------------------------------------- reference
def trl_reference(logits: torch.Tensor, batch: dict, beta: float = 0.1, nll_on_prompt: bool = True) -> dict:
    return workers_trl_reference(logits, batch, beta, nll_on_prompt, vocab_size=TRUE_VOCAB)


def assert_metrics_close(ours: dict, reference: dict, rtol: float = RTOL) -> None:
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name] == pytest.approx(expected, rel=rtol, abs=0), name


def assert_grad_close(ours: torch.Tensor, reference: torch.Tensor, rtol: float = RTOL) -> None:
    # Relative to the largest gradient entry: most entries are softmax tails many orders smaller.
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours.double(), reference.double(), rtol=rtol, atol=rtol * scale)


def loss_and_grad(logits: torch.Tensor, batch: dict, config: ORPOConfig, normalizers=None):
    logits = logits.clone().requires_grad_(True)
    output = orpo_loss(logits, as_micro_batch(batch), config, normalizers)
    output.loss.backward()
    return output, logits.grad


def reference_grad(logits: torch.Tensor, batch: dict, **kwargs) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    trl_reference(logits, batch, **kwargs)["loss"].backward()
    return logits.grad


# ------------------------------------------------------------------------------------------ log1mexp


def _mpmath_log1mexp(x: torch.Tensor) -> torch.Tensor:
    mpmath.mp.dps = 80  # 1 - exp(-100) needs > 44 digits before the log
    return torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(v)))) for v in x.double().tolist()],
                        dtype=torch.float64)


def test_log1mexp_is_accurate_against_mpmath_from_minus_100_to_minus_1e9():
    x32 = -torch.logspace(-9, 2, 8001, dtype=torch.float32)
    exact = _mpmath_log1mexp(x32)  # at the exact fp32 inputs
    ours32 = log1mexp(x32).double()
    assert torch.isfinite(ours32).all()
    # fp32: <= 1 ulp relative (2^-23) for x >= -79. Below, |value| < 5e-35 and torch's fp32 exp loses relative
    # accuracy near its underflow threshold (x ~ -87); what matters there is the absolute error, which is
    # negligible next to the (c - r) term of the log odds.
    upper = x32 >= -79
    rel_err = ((ours32 - exact).abs() / exact.abs())[upper]
    assert rel_err.max() <= 2.0**-23, rel_err.max()
    assert (ours32 - exact).abs()[~upper].max() <= 1e-40

    x64 = -torch.logspace(-9, 2, 8001, dtype=torch.float64)
    rel_err64 = ((log1mexp(x64) - _mpmath_log1mexp(x64)).abs() / _mpmath_log1mexp(x64).abs()).max()
    assert rel_err64 <= 4 * 2.0**-52, rel_err64


def test_log1mexp_gradient_is_finite_and_matches_the_derivative():
    x = -torch.logspace(-9, 2, 8001, dtype=torch.float32)
    x.requires_grad_(True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -1 / expm1(-x), in float64
    expected = -1.0 / torch.expm1(-x.detach().double())
    normal = expected.abs() >= torch.finfo(torch.float32).tiny
    rel_err = ((x.grad.double() - expected).abs() / expected.abs())[normal]
    assert rel_err.max() <= 1e-6, rel_err.max()


def test_log1mexp_is_needed_near_zero():
    """The naive log1p(-exp(x)) the test above guards against really is wrong near 0 in fp32."""
    x = torch.tensor([-1e-9], dtype=torch.float32)
    assert torch.isinf(torch.log1p(-torch.exp(x))).all()
    assert log1mexp(x).item() == pytest.approx(math.log(1e-9), rel=1e-6)


def test_zero_sequence_logp_gives_finite_loss_and_gradients():
    chosen = torch.tensor([0.0, -1e-12, -0.5], requires_grad=True)
    rejected = torch.tensor([-0.3, 0.0, -0.5], requires_grad=True)
    log_odds, or_loss = odds_ratio(chosen, rejected)
    or_loss.sum().backward()
    for tensor in (log_odds, or_loss, chosen.grad, rejected.grad):
        assert torch.isfinite(tensor).all(), tensor
    # P = 1 counts as odds exp(87.3) (log1mexp(-tiny) = log(tiny)): chosen wins outright, rejected loses outright.
    assert or_loss[0] < 1e-30 and or_loss[1] > 50


# ------------------------------------------------------------------------------- TP1 vs TRL formulas


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_loss_metrics_pairs_and_gradient_match_trl_formulas_at_tp1(nll_on_prompt):
    batch = make_micro_batch(num_pairs=3, seq_len=24, seed=1, longest=21)  # 3 columns of pad_to_multiple padding
    logits = make_logits(batch, seed=2)
    config = ORPOConfig(vocab_size=TRUE_VOCAB, beta=0.1, nll_on_prompt=nll_on_prompt)

    output, grad = loss_and_grad(logits, batch, config)
    reference = trl_reference(logits, batch, beta=0.1, nll_on_prompt=nll_on_prompt)

    assert output.loss.dtype == torch.float32
    assert output.loss.item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    for name in ("chosen_logps", "rejected_logps", "log_odds", "chosen_nll"):
        torch.testing.assert_close(getattr(output.pairs, name).double(), reference[name], rtol=RTOL, atol=0)
    assert_metrics_close(output.sums.finalize(config), reference["metrics"])
    assert_grad_close(grad, reference_grad(logits, batch, beta=0.1, nll_on_prompt=nll_on_prompt))
    assert (grad[..., TRUE_VOCAB:] == 0).all()


def test_nll_on_prompt_changes_the_nll_term():
    """Guards the flag itself: with prompts of >= 2 tokens the two NLL definitions must differ."""
    batch = make_micro_batch(num_pairs=2, seq_len=16, seed=3)
    logits = make_logits(batch, seed=4)
    with_prompt = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, nll_on_prompt=True)).sums
    without_prompt = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, nll_on_prompt=False)).sums
    assert with_prompt.num_nll_tokens > without_prompt.num_nll_tokens
    assert without_prompt.num_nll_tokens == (batch["completion_mask"][:2, 1:]).sum()


def test_near_certain_completions_keep_fp32_relative_precision():
    """Completion tokens 18-22 logits above every other column: per-token log-probs ~ -1e-6..-1e-8, where
    log(sum exp) in fp32 would round 1 + 1e-7 to 1; log1mexp then turns a small relative error in the sequence
    logp into the same error in the log odds."""
    batch = make_micro_batch(num_pairs=3, seq_len=20, seed=17)
    gen = torch.Generator().manual_seed(18)
    logits = torch.randn(6, 20, PADDED_VOCAB, generator=gen)
    targets = torch.roll(batch["input_ids"], -1, dims=1)
    completion_targets = torch.roll(batch["completion_mask"], -1, dims=1)
    margin = torch.where(torch.arange(6)[:, None] < 3, 18.0, 14.0) + 4 * torch.rand(6, 20, generator=gen)
    logits.scatter_add_(2, targets[..., None], (margin * completion_targets)[..., None])
    logits[..., TRUE_VOCAB:] = 0.0

    output = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB))
    reference = trl_reference(logits, batch)
    assert reference["chosen_logps"].abs().max() < 1e-5
    for name in ("chosen_logps", "rejected_logps", "log_odds"):
        torch.testing.assert_close(getattr(output.pairs, name).double(), reference[name], rtol=RTOL, atol=0)
    assert output.loss.item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)


@pytest.mark.parametrize("pad_value", [1e30, -1e30, math.inf])
def test_padded_vocab_columns_do_not_change_logps(pad_value):
    batch = make_micro_batch(num_pairs=2, seq_len=16, seed=5)
    clean = make_logits(batch, seed=6)
    polluted = make_logits(batch, seed=6, pad_value=pad_value)
    config = ORPOConfig(TRUE_VOCAB)

    clean_out, clean_grad = loss_and_grad(clean, batch, config)
    polluted_out, polluted_grad = loss_and_grad(polluted, batch, config)
    for name in ("chosen_logps", "rejected_logps", "log_odds", "chosen_nll"):
        assert torch.equal(getattr(polluted_out.pairs, name), getattr(clean_out.pairs, name)), name
    assert torch.equal(polluted_out.loss, clean_out.loss)
    assert torch.equal(polluted_grad, clean_grad)
    assert polluted_out.sums.finalize(config)["logits/chosen"] == clean_out.sums.finalize(config)["logits/chosen"]


def test_trl_odds_ratio_loss_and_batch_logps_agree_with_ours():
    """TRL 1.16 itself: `get_batch_logps` on the true-vocab logits and `odds_ratio_loss` on the same logps."""
    from trl.experimental.orpo import ORPOTrainer

    batch = make_micro_batch(num_pairs=4, seq_len=20, seed=7)
    logits = make_logits(batch, seed=8)
    config = ORPOConfig(TRUE_VOCAB, beta=0.25)
    output = orpo_loss(logits, as_micro_batch(batch), config)

    labels = torch.where(batch["completion_mask"], batch["input_ids"], -100)
    trl_logps = ORPOTrainer.get_batch_logps(logits[..., :TRUE_VOCAB], labels, average_log_prob=True)
    ours_logps = torch.cat([output.pairs.chosen_logps, output.pairs.rejected_logps])
    torch.testing.assert_close(ours_logps, trl_logps, rtol=RTOL, atol=0)

    class TrainerStandIn:
        beta = config.beta

        class accelerator:
            device = torch.device("cpu")

    chosen, rejected = output.pairs.chosen_logps, output.pairs.rejected_logps
    losses, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(
        TrainerStandIn(), chosen, rejected
    )
    log_odds, or_loss = odds_ratio(chosen, rejected)
    torch.testing.assert_close(log_odds, output.pairs.log_odds)
    torch.testing.assert_close(-config.beta * or_loss, losses, rtol=RTOL, atol=0)
    metrics = output.sums.finalize(config)
    assert metrics["log_odds_ratio"] == pytest.approx(mean_ratio.item(), rel=RTOL)
    assert metrics["log_odds_chosen"] == pytest.approx(mean_log_odds.item(), rel=RTOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=RTOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=RTOL)


# ---------------------------------------------------------------------------- global-batch normalization


def test_micro_batch_shares_sum_to_the_global_batch_loss_and_metrics():
    """Two micro-batches of different lengths (gradient accumulation) give the loss, gradient and metrics of the
    whole batch: pooled token-mean NLL and pair-mean OR over all pairs."""
    first = make_micro_batch(num_pairs=2, seq_len=14, seed=9)
    second = make_micro_batch(num_pairs=3, seq_len=22, seed=10)
    first_logits, second_logits = make_logits(first, seed=11), make_logits(second, seed=12)
    config = ORPOConfig(TRUE_VOCAB, beta=0.1)
    normalizers = GlobalNormalizers.of_micro_batches([as_micro_batch(first), as_micro_batch(second)],
                                                     config.nll_on_prompt)

    first_out, first_grad = loss_and_grad(first_logits, first, config, normalizers)
    second_out, second_grad = loss_and_grad(second_logits, second, config, normalizers)
    metrics = ORPOMetricSums.total([first_out.sums, second_out.sums]).finalize(config)

    # Reference: the whole batch as one, padded to the longer length; rows reordered chosen-then-rejected.
    whole, whole_logits = concat_pairs([first, second], [first_logits, second_logits])
    reference = trl_reference(whole_logits, whole)
    assert (first_out.loss + second_out.loss).item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    ref_grad = reference_grad(whole_logits, whole)
    assert_grad_close(torch.cat([g.flatten() for g in (first_grad, second_grad)]),
                      torch.cat([g.flatten() for g in split_back(ref_grad, [first, second])]))

    # The logits metric follows TRL per micro-batch (positions up to each micro-batch's longest row), pooled.
    expected = dict(reference["metrics"])
    for half in ("chosen", "rejected"):
        sums, counts = 0.0, 0
        for batch, logits in ((first, first_logits), (second, second_logits)):
            pairs, longest = batch["input_ids"].shape[0] // 2, int(batch["attention_mask"].sum(-1).max())
            block = logits[:pairs] if half == "chosen" else logits[pairs:]
            block = block[:, : longest - 1, :TRUE_VOCAB].double()
            sums, counts = sums + block.sum().item(), counts + block.numel()
        expected[f"logits/{half}"] = sums / counts
    assert_metrics_close(metrics, expected)


def concat_pairs(batches: list[dict], logits: list[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """One micro-batch holding all pairs of `batches` (right-padded to the longest S), and its logits."""
    seq_len = max(b["input_ids"].shape[1] for b in batches)

    def pad(tensor, value):
        return F.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, seq_len - tensor.shape[1]], value=value)

    def halves(tensor):
        pairs = tensor.shape[0] // 2
        return tensor[:pairs], tensor[pairs:]

    whole = {}
    for key, value in (("input_ids", PAD_ID), ("attention_mask", 0), ("completion_mask", False)):
        parts = [halves(pad(b[key], value)) for b in batches]
        whole[key] = torch.cat([c for c, _ in parts] + [r for _, r in parts])
    parts = [halves(pad(x, 0.0)) for x in logits]
    return whole, torch.cat([c for c, _ in parts] + [r for _, r in parts])


def split_back(whole: torch.Tensor, batches: list[dict]) -> list[torch.Tensor]:
    """Inverse of concat_pairs for a [2B_total, S, V] tensor: each micro-batch's rows, cut to its S."""
    pair_counts = [b["input_ids"].shape[0] // 2 for b in batches]
    total, chosen_start, out = sum(pair_counts), 0, []
    for b, pairs in zip(batches, pair_counts):
        seq_len = b["input_ids"].shape[1]
        chosen = whole[chosen_start : chosen_start + pairs, :seq_len]
        rejected = whole[total + chosen_start : total + chosen_start + pairs, :seq_len]
        out.append(torch.cat([chosen, rejected]))
        chosen_start += pairs
    return out


# -------------------------------------------------------------------------------------------- bf16


def test_bf16_logits_are_scored_in_fp32():
    """bf16 logits are upcast exactly before any arithmetic, so ours on bf16 logits matches the float64
    reference on the bf16-rounded logits to the fp32 tolerance; scoring in bf16 (TRL with bf16 logits) misses it
    by orders of magnitude more."""
    batch = make_micro_batch(num_pairs=3, seq_len=24, seed=13)
    logits_bf16 = make_logits(batch, seed=14).bfloat16()
    config = ORPOConfig(TRUE_VOCAB)

    output, grad = loss_and_grad(logits_bf16, batch, config)
    reference = trl_reference(logits_bf16.float(), batch)
    assert grad.dtype == torch.bfloat16
    ours_error = (output.pairs.chosen_logps.double() - reference["chosen_logps"]).abs().max().item()
    assert ours_error <= RTOL * reference["chosen_logps"].abs().max().item()
    assert output.loss.item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    assert_metrics_close(output.sums.finalize(config), reference["metrics"])
    # The gradient is returned in bf16: compare at bf16's resolution (2^-8 relative).
    assert_grad_close(grad.float(), reference_grad(logits_bf16.float(), batch), rtol=2.0**-8)

    labels = torch.where(batch["completion_mask"], batch["input_ids"], -100)[:, 1:]
    mask = labels != -100
    bf16_token_logps = torch.gather(logits_bf16[:, :-1, :TRUE_VOCAB].log_softmax(-1), 2,
                                    labels.clamp(min=0)[..., None]).squeeze(-1)
    bf16_logps = ((bf16_token_logps * mask).sum(-1) / mask.sum(-1))[:3]
    bf16_error = (bf16_logps.double() - reference["chosen_logps"]).abs().max().item()
    assert bf16_error > 100 * ours_error


# ------------------------------------------------------------------------------------- packed layout


def make_pairs(num_pairs: int, seed: int) -> dict:
    """Pair columns as the data layer stores them: a shared prompt, two completions of different lengths."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, TRUE_VOCAB, (int(torch.randint(low, high, (), generator=gen)),), generator=gen).tolist()

    return {"row_index": list(range(200, 200 + num_pairs)),
            "prompt_input_ids": [[1] + tokens(1, 6) for _ in range(num_pairs)],
            "chosen_input_ids": [tokens(1, 9) + [PAD_ID] for _ in range(num_pairs)],
            "rejected_input_ids": [tokens(1, 9) + [PAD_ID] for _ in range(num_pairs)]}


def padded_dict(pairs: dict) -> tuple[dict, list[list[int]]]:
    """The padded batch TRL's collator makes of the pairs (chosen rows, then rejected rows), and the sequences."""
    prompts = pairs["prompt_input_ids"] * 2
    sequences = [p + c for p, c in zip(prompts, pairs["chosen_input_ids"] + pairs["rejected_input_ids"])]
    return trl_padded_batch(pairs, PAD_ID), sequences


def packed_positions(sequences: list[list[int]]) -> list[tuple[int, int]]:
    """(row, position) of the padded batch behind each position of the packed row, sequences back to back."""
    return [(row, position) for row, sequence in enumerate(sequences) for position in range(len(sequence))]


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_packed_row_gives_the_loss_pairs_metrics_and_gradient_of_the_padded_batch(nll_on_prompt):
    """The same pairs packed into one row (padding only at its end) and padded as TRL pads them: the packed
    row's logits are the padded batch's at the same tokens, so everything must agree with TRL's formulas on the
    padded batch, except `logits/*`, which TRL averages over padding positions a packed row does not have."""
    pairs = make_pairs(num_pairs=3, seed=30)
    batch, sequences = padded_dict(pairs)
    logits = make_logits(batch, seed=31)
    packed = packed_micro_batch(pairs, PAD_ID, length_multiple=16)
    check_micro_batch(packed, TRUE_VOCAB)
    positions = packed_positions(sequences)
    assert packed.input_ids.shape[1] % 16 == 0 and packed.input_ids.shape[1] > len(positions)  # a padding tail
    packed_logits = torch.randn(1, packed.input_ids.shape[1], PADDED_VOCAB, generator=torch.Generator().manual_seed(32))
    for t, (row, position) in enumerate(positions):
        packed_logits[0, t] = logits[row, position]
    config = ORPOConfig(TRUE_VOCAB, beta=0.1, nll_on_prompt=nll_on_prompt)

    output, grad = loss_and_grad_of(packed_logits, packed, config)
    reference = trl_reference(logits, batch, beta=0.1, nll_on_prompt=nll_on_prompt)
    assert output.loss.item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    for name in ("chosen_logps", "rejected_logps", "log_odds", "chosen_nll"):
        torch.testing.assert_close(getattr(output.pairs, name).double(), reference[name], rtol=RTOL, atol=0)
    expected = dict(reference["metrics"])
    for half, rows in (("chosen", range(3)), ("rejected", range(3, 6))):
        block = torch.cat([logits[row, :len(sequences[row]) - 1, :TRUE_VOCAB] for row in rows]).double()
        expected[f"logits/{half}"] = block.mean().item()  # every position with a next token of its sequence
    assert_metrics_close(output.sums.finalize(config), expected)

    reference_gradient = reference_grad(logits, batch, nll_on_prompt=nll_on_prompt)
    expected_grad = torch.zeros_like(grad)
    for t, (row, position) in enumerate(positions):
        expected_grad[0, t] = reference_gradient[row, position]
    assert_grad_close(grad, expected_grad)  # and exactly 0 on the padding tail


def loss_and_grad_of(logits: torch.Tensor, micro_batch: MicroBatch, config: ORPOConfig):
    logits = logits.clone().requires_grad_(True)
    output = orpo_loss(logits, micro_batch, config)
    output.loss.backward()
    return output, logits.grad


# ------------------------------------------------------------------------------ TRL's CPO family


def cpo_case_reference(logits: torch.Tensor, batch: dict, case: dict) -> dict:
    return cpo_reference(logits, batch, vocab_size=TRUE_VOCAB, **case)


def cpo_reference_grad(logits: torch.Tensor, batch: dict, case: dict) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    cpo_case_reference(logits, batch, case)["loss"].backward()
    return logits.grad


CPO_PAIR_VALUES = ("chosen_logps", "rejected_logps", "pair_loss", "chosen_nll")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_family_loss_pairs_metrics_and_gradient_match_trl_cpo_trainer(case, layout):
    """TRL 1.16's own `CPOTrainer.get_batch_logps` and `cpo_loss` (float64) on the padded batch; the packed row
    holds the same logits at the same tokens."""
    pairs = make_pairs(num_pairs=3, seed=40)
    batch, sequences = padded_dict(pairs)
    logits = make_logits(batch, seed=41)
    config = ORPOConfig(TRUE_VOCAB, **CPO_CASES[case])
    reference = cpo_case_reference(logits, batch, CPO_CASES[case])
    reference_gradient = cpo_reference_grad(logits, batch, CPO_CASES[case])
    expected = dict(reference["metrics"])
    if layout == "padded":
        output, grad = loss_and_grad(logits, batch, config)
        expected_grad = reference_gradient
    else:
        packed = packed_micro_batch(pairs, PAD_ID, length_multiple=16)
        check_micro_batch(packed, TRUE_VOCAB)
        positions = packed_positions(sequences)
        packed_logits = torch.randn(1, packed.input_ids.shape[1], PADDED_VOCAB,
                                    generator=torch.Generator().manual_seed(42))
        expected_grad = torch.zeros_like(packed_logits)
        for t, (row, position) in enumerate(positions):
            packed_logits[0, t] = logits[row, position]
            expected_grad[0, t] = reference_gradient[row, position]
        output, grad = loss_and_grad_of(packed_logits, packed, config)
        for half, rows in (("chosen", range(3)), ("rejected", range(3, 6))):
            block = torch.cat([logits[row, :len(sequences[row]) - 1, :TRUE_VOCAB] for row in rows]).double()
            expected[f"logits/{half}"] = block.mean().item()

    assert output.loss.item() == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    for name in CPO_PAIR_VALUES:
        torch.testing.assert_close(getattr(output.pairs, name).double(), reference[name], rtol=RTOL, atol=RTOL)
    assert output.pairs.log_odds is None
    assert_metrics_close(output.sums.finalize(config), expected)
    assert_grad_close(grad, expected_grad)


def test_cpo_family_cases_are_not_degenerate():
    """The cases above exercise what they claim: hinge pairs on both sides of the hinge, sum vs mean log-probs,
    the margin and smoothing terms moving the loss."""
    batch, _ = padded_dict(make_pairs(num_pairs=3, seed=40))
    logits = make_logits(batch, seed=41)
    hinge = cpo_case_reference(logits, batch, CPO_CASES["hinge"])["pair_loss"]
    assert (hinge == 0).any() and (hinge > 0).any()
    summed = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, loss_type="sigmoid")).pairs
    averaged = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, loss_type="ipo")).pairs
    assert (summed.chosen_logps < averaged.chosen_logps - 1).any()
    base = dict(loss_type="simpo", beta=2.0)
    plain = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, **base)).pairs.pair_loss
    for changed in (dict(simpo_gamma=1.5), dict(label_smoothing=0.2)):
        other = orpo_loss(logits, as_micro_batch(batch), ORPOConfig(TRUE_VOCAB, **base, **changed)).pairs.pair_loss
        assert not torch.allclose(plain, other), changed


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="orpo", cpo_alpha=1.0), "--cpo-alpha applies to the CPO losses"),
    (dict(loss_type="sigmoid", simpo_gamma=0.5), "--simpo-gamma applies to --loss-type simpo only"),
    (dict(loss_type="hinge", label_smoothing=0.1), "--label-smoothing applies to --loss-type sigmoid and simpo"),
    (dict(loss_type="orpo", label_smoothing=0.1), "--label-smoothing applies"),
    (dict(loss_type="ipo", beta=0.0), r"--beta must be a finite number > 0 for --loss-type ipo"),
    (dict(loss_type="sigmoid", label_smoothing=0.5), r"--label-smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="simpo", cpo_alpha=-1.0), "--cpo-alpha must be a finite number >= 0"),
    (dict(loss_type="dpo"), "--loss-type must be one of orpo, sigmoid, hinge, ipo, simpo"),
])
def test_loss_flags_the_loss_type_ignores_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ORPOConfig(TRUE_VOCAB, **kwargs)


def test_defaults_follow_trl_per_loss_type():
    orpo, cpo, simpo = (ORPOConfig(TRUE_VOCAB, loss_type=t) for t in ("orpo", "sigmoid", "simpo"))
    assert (orpo.beta, orpo.nll_on_prompt, orpo.nll_weight, orpo.pair_weight) == (0.1, True, 1.0, 0.1)
    assert (cpo.beta, cpo.nll_on_prompt, cpo.cpo_alpha, cpo.simpo_gamma) == (0.1, False, 1.0, None)
    assert (simpo.simpo_gamma, simpo.label_smoothing) == (0.5, 0.0)


def test_loss_on_meta_tensors_needs_no_host_values():
    """The loss path creates no tensor on the host and reads nothing back from the device: on the meta device
    (tensors without data) a host tensor in an operation, `.item()`, `.tolist()` or boolean indexing raises."""
    pairs = make_pairs(num_pairs=2, seed=33)
    for micro_batch in (packed_micro_batch(pairs, PAD_ID, 8), as_micro_batch(padded_dict(pairs)[0])):
        on_meta = micro_batch.to_device(torch.device("meta"))
        logits = torch.zeros(*micro_batch.input_ids.shape, PADDED_VOCAB, device="meta", requires_grad=True)
        output = orpo_loss(logits, on_meta, ORPOConfig(TRUE_VOCAB),
                           GlobalNormalizers.of_micro_batches([micro_batch]))
        output.loss.backward()
        assert output.loss.device.type == "meta" and logits.grad.device.type == "meta"
        assert all(value.device.type == "meta" for value in output.sums.to_tensor().unbind())


# --------------------------------------------------------------------------------------------- errors


def test_micro_batch_that_breaks_the_contract_is_rejected_naming_the_source_row():
    batch = make_micro_batch(num_pairs=2, seq_len=12, seed=15)

    out_of_vocab = dict(batch, input_ids=batch["input_ids"].clone())
    out_of_vocab["input_ids"][1, 3] = TRUE_VOCAB
    with pytest.raises(ObjectiveInputError, match=r"source row 101 \(chosen sequence\) holds token id 600, outside "
                                                  r"the vocabulary \[0, 600\)"):
        as_micro_batch(out_of_vocab)

    empty = dict(batch, completion_mask=batch["completion_mask"].clone())
    empty["completion_mask"][2] = False
    with pytest.raises(ObjectiveInputError, match=r"source row 100 \(rejected sequence\) has no completion token"):
        as_micro_batch(empty)

    odd = {key: value[:3] for key, value in batch.items()}
    with pytest.raises(ObjectiveInputError, match="even number of sequences"):
        as_micro_batch(odd)

    with pytest.raises(ValueError, match="--beta"):
        ORPOConfig(TRUE_VOCAB, beta=-1.0)


# -------------------------------------------------------------------------------- TP2 and DP2 (torchrun)


@pytest.fixture(scope="module")
def parallel_run(torchrun, tmp_path_factory):
    """One 2-process run of tests/workers/objective_parallel.py; returns (inputs, results)."""
    tmp = tmp_path_factory.mktemp("objective_parallel")
    tp2_batch = make_micro_batch(num_pairs=3, seq_len=24, seed=19, longest=22)
    fp32 = make_logits(tp2_batch, seed=20, pad_value=1e30)
    tied = make_logits(tp2_batch, seed=21)
    # The global max sits on both ranks (columns 5 and 400), so each rank leaves out its own copy of exp(0).
    tied[..., 5] = tied[..., 400] = tied[..., :TRUE_VOCAB].amax(-1) + 3.0
    dp2_batches = [make_micro_batch(num_pairs=2, seq_len=14, seed=22),
                   make_micro_batch(num_pairs=3, seq_len=22, seed=23)]
    inputs = {
        "config": {"vocab_size": TRUE_VOCAB, "beta": 0.1, "nll_on_prompt": True},
        "tp2_batch": tp2_batch,
        "tp2_logits": {"fp32": fp32, "bf16": fp32.bfloat16(), "tied_max": tied},
        "dp2_batches": dp2_batches,
        "dp2_logits": [make_logits(batch, seed=24 + i) for i, batch in enumerate(dp2_batches)],
        "cpo_configs": CPO_CASES,
    }
    torch.save(inputs, tmp / "inputs.pt")
    torchrun("objective_parallel.py", 2, "--inputs", str(tmp / "inputs.pt"), "--out", str(tmp / "out.pt"))
    return inputs, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("case", ["fp32", "tied_max"])
def test_vocab_parallel_loss_metrics_and_gradient_at_tp2_match_the_whole_vocabulary(parallel_run, case):
    inputs, results = parallel_run
    batch, logits, result = inputs["tp2_batch"], inputs["tp2_logits"][case], results["tp2"][case]
    reference = trl_reference(logits, batch)

    assert result["loss"] == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    for name, value in result["pairs"].items():
        torch.testing.assert_close(value.double(), reference[name], rtol=RTOL, atol=0)
    assert_metrics_close(result["metrics"], reference["metrics"])
    assert_grad_close(result["grad"], reference_grad(logits, batch))
    assert (result["grad"][..., TRUE_VOCAB:] == 0).all()


def test_bf16_logits_at_tp2_are_scored_in_fp32(parallel_run):
    inputs, results = parallel_run
    batch, logits_bf16, result = inputs["tp2_batch"], inputs["tp2_logits"]["bf16"], results["tp2"]["bf16"]
    rounded = logits_bf16.float()
    rounded[..., TRUE_VOCAB:] = 0.0  # 1e30 padding is inf in bf16; the reference never reads it anyway
    reference = trl_reference(rounded, batch)
    for name, value in result["pairs"].items():
        torch.testing.assert_close(value.double(), reference[name], rtol=RTOL, atol=0)
    assert_metrics_close(result["metrics"], reference["metrics"])
    assert result["grad"].dtype == torch.bfloat16
    assert_grad_close(result["grad"].float(), reference_grad(rounded, batch), rtol=2.0**-8)


def test_dp2_shares_sum_to_the_global_batch_loss_gradient_and_metrics(parallel_run):
    inputs, results = parallel_run
    batches, logits, result = inputs["dp2_batches"], inputs["dp2_logits"], results["dp2"]
    whole, whole_logits = concat_pairs(batches, logits)
    reference = trl_reference(whole_logits, whole)

    assert result["normalizers"] == (5, int((whole["attention_mask"][:5, 1:]).sum()))
    assert result["loss"] == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    assert_grad_close(torch.cat([g.flatten() for g in result["grads"]]),
                      torch.cat([g.flatten() for g in split_back(reference_grad(whole_logits, whole), batches)]))
    for name in ("loss", "nll_loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "log_odds_ratio",
                 "log_odds_chosen"):
        assert result["metrics"][name] == pytest.approx(reference["metrics"][name], rel=RTOL), name


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_family_at_tp2_in_fp32_and_bf16_and_dp2_matches_trl_cpo_trainer(parallel_run, case):
    """Vocabulary split over TP2 (fp32 logits, and bf16 logits scored in fp32: the reference is computed on the
    bf16-rounded logits, so the same fp32 bound holds; the bf16 gradient is rounded once, 2^-8), and the batch
    split over DP2 normalized by the global counts."""
    inputs, results = parallel_run
    batch, result = inputs["tp2_batch"], results["cpo"][case]
    for precision in ("fp32", "bf16"):
        logits = inputs["tp2_logits"][precision].float()
        logits[..., TRUE_VOCAB:] = 0.0  # the reference never reads the padding columns
        reference = cpo_case_reference(logits, batch, CPO_CASES[case])
        ours = result["tp2"][precision]
        assert ours["loss"] == pytest.approx(reference["metrics"]["loss"], rel=RTOL), precision
        for name, value in ours["pairs"].items():
            torch.testing.assert_close(value.double(), reference[name], rtol=RTOL, atol=RTOL)
        assert set(ours["pairs"]) == set(CPO_PAIR_VALUES)
        assert_metrics_close(ours["metrics"], reference["metrics"])
        grad_rtol = RTOL if precision == "fp32" else 2.0**-8
        assert_grad_close(ours["grad"].float(), cpo_reference_grad(logits, batch, CPO_CASES[case]), rtol=grad_rtol)

    batches, logits = inputs["dp2_batches"], inputs["dp2_logits"]
    whole, whole_logits = concat_pairs(batches, logits)
    reference = cpo_case_reference(whole_logits, whole, CPO_CASES[case])
    assert result["dp2"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    assert_grad_close(torch.cat([g.flatten() for g in result["dp2"]["grads"]]),
                      torch.cat([g.flatten() for g in split_back(cpo_reference_grad(whole_logits, whole,
                                                                                    CPO_CASES[case]), batches)]))
    for name in ("loss", "nll_loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert result["dp2"]["metrics"][name] == pytest.approx(reference["metrics"][name], rel=RTOL), name
