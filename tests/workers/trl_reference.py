"""TRL ORPOTrainer's loss and metrics written out in plain PyTorch: the independent reference of the tests.

Follows TRL's `get_batch_logps(average_log_prob=True)`, `cross_entropy_loss` on the chosen rows (prompt included by
default), `odds_ratio_loss` and the logged metrics (orpo-reference-implementations.md, sections 1.4-1.8), on a
batch padded as TRL's collator pads pairs (`trl_padded_batch`); and TRL CPOTrainer's (`cpo_reference`), through
TRL's own functions, for the CPO-family configs the tests share (`CPO_CASES`).
"""
import torch
import torch.nn.functional as F

# Every flag off its default; simpo both pure (cpo_alpha 0) and with the NLL term.
CPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.3, cpo_alpha=0.7, label_smoothing=0.2),
    "hinge": dict(loss_type="hinge", beta=0.05, cpo_alpha=1.5),
    "ipo": dict(loss_type="ipo", beta=0.4, cpo_alpha=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, cpo_alpha=0.0, simpo_gamma=0.8, label_smoothing=0.1),
    "simpo_nll": dict(loss_type="simpo", beta=2.5, cpo_alpha=0.3, simpo_gamma=1.2),
}


def trl_padded_batch(pairs: dict, pad_id: int) -> dict:
    """Pair columns (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`) as TRL's collator pads them:
    chosen rows then rejected rows, right-padded to the longest, with attention and completion masks."""
    prompts = pairs["prompt_input_ids"] * 2
    sequences = [p + c for p, c in zip(prompts, pairs["chosen_input_ids"] + pairs["rejected_input_ids"])]
    longest = max(map(len, sequences))
    batch = {"input_ids": torch.full((len(sequences), longest), pad_id),
             "attention_mask": torch.zeros(len(sequences), longest, dtype=torch.long),
             "completion_mask": torch.zeros(len(sequences), longest, dtype=torch.bool)}
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        batch["input_ids"][row, :len(sequence)] = torch.tensor(sequence)
        batch["attention_mask"][row, :len(sequence)] = 1
        batch["completion_mask"][row, len(prompt):len(sequence)] = True
    return batch


def shared_metrics(loss, chosen_rewards, rejected_rewards, chosen, rejected, logits, nll_loss) -> dict:
    """The metrics both TRL trainers log, from per-pair values and the [2B, S, V] logits cut to the longest row."""
    num_pairs = chosen.shape[0]
    return {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
        "logits/chosen": logits[:num_pairs, :-1].mean().item(),
        "logits/rejected": logits[num_pairs:, :-1].mean().item(),
        "nll_loss": nll_loss.item(),
    }


def trl_reference(logits: torch.Tensor, batch: dict, beta: float = 0.1, nll_on_prompt: bool = True,
                  vocab_size: int | None = None) -> dict:
    """TRL ORPOTrainer's loss and metrics (float64) on the true-vocabulary logits, batch cut to its longest row.

    `logits` may require grad; the returned "loss" is differentiable w.r.t. it. Columns from `vocab_size` on
    (padding of the output layer) are dropped; by default all columns are real.
    """
    vocab_size = vocab_size or logits.shape[-1]
    num_pairs = batch["input_ids"].shape[0] // 2
    longest = int(batch["attention_mask"].sum(-1).max())
    logits = logits[:, :longest, :vocab_size].double()
    input_ids = batch["input_ids"][:, :longest]
    attention = batch["attention_mask"][:, :longest]
    completion = batch["completion_mask"][:, :longest]

    # get_batch_logps(average_log_prob=True) on prompt-masked labels
    labels = torch.where(completion, input_ids, -100)[:, 1:]
    loss_mask = labels != -100
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
    logps = (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    chosen, rejected = logps[:num_pairs], logps[num_pairs:]

    # cross_entropy_loss on chosen rows: labels are input_ids where attention_mask == 1 (or completion labels)
    nll_targets = attention == 1 if nll_on_prompt else completion
    nll_labels = torch.where(nll_targets, input_ids, -100)
    nll_loss = F.cross_entropy(
        logits[:num_pairs, :-1].reshape(-1, vocab_size), nll_labels[:num_pairs, 1:].reshape(-1), ignore_index=-100
    )
    nll_rows = F.cross_entropy(
        logits[:num_pairs, :-1].transpose(1, 2), nll_labels[:num_pairs, 1:], ignore_index=-100, reduction="none"
    )
    chosen_nll = nll_rows.sum(-1) / (nll_labels[:num_pairs, 1:] != -100).sum(-1)

    # odds_ratio_loss, written out plainly (float64 has no cancellation problem at these values)
    log_odds = (chosen - rejected) - (torch.log(1 - torch.exp(chosen)) - torch.log(1 - torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    loss = nll_loss - (beta * ratio).mean()
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    return {
        "loss": loss,
        "chosen_logps": chosen.detach(),
        "rejected_logps": rejected.detach(),
        "log_odds": log_odds.detach(),
        "pair_loss": -ratio.detach(),
        "chosen_nll": chosen_nll.detach(),
        "metrics": {
            **shared_metrics(loss, chosen_rewards, rejected_rewards, chosen, rejected, logits, nll_loss),
            "log_odds_ratio": ratio.mean().item(),
            "log_odds_chosen": log_odds.mean().item(),
        },
    }


def cpo_reference(logits: torch.Tensor, batch: dict, loss_type: str, beta: float = 0.1, cpo_alpha: float = 1.0,
                  simpo_gamma: float = 0.5, label_smoothing: float = 0.0, vocab_size: int | None = None) -> dict:
    """TRL CPOTrainer's loss and metrics (float64) through TRL's own `get_batch_logps` and `cpo_loss`, with its
    NLL (`cross_entropy_loss` on the chosen rows' completion labels; 0 when cpo_alpha is 0).

    `logits/*` average the positions that predict a token (`logits[:, :-1]`) as ORPOTrainer does; CPOTrainer
    also averages the last position of the longest row, a metric-only difference our objective does not copy.
    """
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    vocab_size = vocab_size or logits.shape[-1]
    num_pairs = batch["input_ids"].shape[0] // 2
    longest = int(batch["attention_mask"].sum(-1).max())
    logits = logits[:, :longest, :vocab_size].double()
    completion = batch["completion_mask"][:, :longest]
    labels = torch.where(completion, batch["input_ids"][:, :longest], -100)

    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=loss_type in ("ipo", "simpo"))
    chosen, rejected = logps[:num_pairs], logps[num_pairs:]
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma,
                              label_smoothing=label_smoothing, accelerator=SimpleNamespace(device=logits.device))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    nll_rows = F.cross_entropy(logits[:num_pairs, :-1].transpose(1, 2), labels[:num_pairs, 1:], ignore_index=-100,
                               reduction="none")
    nll_loss = nll_rows.sum() / (labels[:num_pairs, 1:] != -100).sum() if cpo_alpha else torch.zeros((),
                                                                                                    dtype=torch.float64)
    loss = losses.mean() + cpo_alpha * nll_loss
    return {
        "loss": loss,
        "chosen_logps": chosen.detach(),
        "rejected_logps": rejected.detach(),
        "pair_loss": losses.detach(),
        "chosen_nll": (nll_rows.sum(-1) / (labels[:num_pairs, 1:] != -100).sum(-1)).detach(),
        "metrics": shared_metrics(loss, chosen_rewards, rejected_rewards, chosen, rejected, logits, nll_loss),
    }
