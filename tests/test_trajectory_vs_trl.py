"""Three training steps of our trainer equal TRL's, step for step: ORPOTrainer for `--loss-type orpo`, and
`trl.experimental.cpo.CPOTrainer` for the CPO family (`sigmoid` with label smoothing, pure SimPO).

Both sides are aligned as `benchmarks/orpo_vs_trl.py` aligns them (its helpers build both): the same pairs in
the same order, 2 pairs a step (in one micro-batch unless said), linear LR decay without warmup, fp32; here on
the tiny Mixtral (TRL from its HF folder, ours from its conversion), with the loss's and the optimizer's settings
off both sides' defaults. Compared: every step's loss, grad norm, learning rate and TRL-named metrics, and every
weight after the last step.

Gradient accumulation (2 micro-batches of 1 pair a step) is compared for pure SimPO only. TRL averages the
micro-batches' losses, each its own token-mean NLL plus pair-mean term; ours divides the step's NLL sum by the
step's NLL tokens (objective.py, "Normalization"). Pair terms agree for micro-batches of equally many pairs; NLL
terms only for equally many NLL tokens, so with an NLL term (ORPO, cpo_alpha > 0) the two differ by design
(measured: step 1's nll_loss, on the same weights, 1.6e-3 relative apart for ORPO and 4.2e-3 for sigmoid).

Two things are left out on purpose, because the two sides define them differently:
- the MoE load-balancing loss (off on both sides): transformers' Mixtral pools the router statistics of all layers
  into one loss, sum_e f_e P_e over the layers' tokens together (f counting top-k picks); Megatron's router adds
  one loss per layer, each over its own layer's f and P (f divided by top-k). The two differ in value and gradient.
- `logits/*`: TRL averages every position of its padded rows (CPOTrainer even the last), padding included, and
  its padding positions see other keys than ours; ours are packed rows without padding. The objective's tests
  check these metrics against TRL's formula on TRL's layout (test_orpo_vs_transformers.py).
"""
import json
import os

import pytest
import torch
from conftest import checkpoint_weights, trainer_signal_handlers_undone
from megatron.core import parallel_state
from test_orpo_vs_trl_benchmark import load_benchmark
from workers.trl_reference import CPO_CASES

from orpo_megatron import parallel, train
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import hf_mapping
from orpo_megatron.checkpoint import training as checkpointing

NUM_STEPS, NUM_PAIRS = 3, 8
LR = 1e-3  # large enough that a lost optimizer setting moves steps 2 and 3 and the weights beyond the tolerances
# (our flag, TRL's config field, value); every value off both sides' defaults.
OPTIMIZER = [("--adam-beta1", "adam_beta1", 0.8), ("--adam-beta2", "adam_beta2", 0.95),
             ("--adam-eps", "adam_epsilon", 1e-6), ("--weight-decay", "weight_decay", 0.1),
             ("--clip-grad", "max_grad_norm", 0.5)]
CASES = {"orpo": dict(loss_type="orpo", beta=0.25), "sigmoid": CPO_CASES["sigmoid"], "simpo": CPO_CASES["simpo"]}
METRICS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll_loss"]
ORPO_METRICS = ["log_odds_ratio", "log_odds_chosen"]
DIFFERENCES = {"rewards/margins": ("rewards/chosen", "rewards/rejected"),
               "log_odds_chosen": ("logps/chosen", "logps/rejected")}
# fp32. The sides compute the same steps in another order (packed rows vs padded rows with a key mask, Megatron's
# fused QKV, expert GEMMs, log-softmax and distributed optimizer vs transformers' and torch's); measured: metrics
# within 5e-7 relative, updates within 4e-5. Leaving one optimizer flag at our default (beta2, eps, weight decay
# or clipping) moves the grad norm by 1.3e-4 to 4e-3 and a tensor's update by 2e-2 to 2e-1.
METRIC_TOL = 1e-4  # relative
WEIGHT_TOL = 1e-3  # of each tensor's update over the 3 steps, relative to its norm


@pytest.fixture(scope="module")
def inputs(tiny_mixtral, tiny_converted, tmp_path_factory) -> dict:
    bench = load_benchmark()
    folder = tmp_path_factory.mktemp("trajectory")
    return {"bench": bench, "hf_dir": tiny_mixtral, "checkpoint": tiny_converted, "cache": str(folder / "cache"),
            "data": bench.write_pairs(str(folder / "pairs.jsonl"), NUM_PAIRS)}


def run_ours(inputs: dict, case: dict, micro_batch_size: int, save: str) -> dict[int, dict]:
    """Our trainer in this process; every step's metrics from its metrics.jsonl."""
    loss_flags = [item for key, value in case.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    optimizer_flags = [item for flag, _, value in OPTIMIZER for item in (flag, str(value))]
    argv = (inputs["bench"].our_train_args(inputs, inputs["cache"], "fp32", NUM_STEPS, lr=LR, log_interval=1,
                                           micro_batch_size=micro_batch_size)
            + loss_flags + optimizer_flags + ["--moe-aux-loss-coeff", "0", "--save", save])
    if parallel_state.model_parallel_is_initialized():  # another test's one-process group (conversion)
        parallel.destroy()
    with trainer_signal_handlers_undone():
        assert train.main(argv) == 0
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    return {row["iteration"]: {key.removeprefix("train/"): value for key, value in row.items()}
            for row in rows if "train/loss" in row}


def run_trl(inputs: dict, case: dict, micro_batch_size: int, output_dir: str):
    """TRL's trainer on the same pairs; every step's logged values, and the trainer (its model trained)."""
    case = dict(case)
    trainer = inputs["bench"].trl_trainer(
        inputs, output_dir, "fp32", NUM_STEPS, loss_type=case.pop("loss_type"), load_balancing=False,
        learning_rate=LR, logging_steps=1, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=inputs["bench"].PAIRS_PER_STEP // micro_batch_size, **case,
        **{field: value for _, field, value in OPTIMIZER})
    trainer.train()
    return {row["step"]: row for row in trainer.state.log_history if "loss" in row}, trainer


def trl_weights_as_ours(model: torch.nn.Module, hf, padded_vocab: int) -> dict[str, torch.Tensor]:
    """TRL's trained weights under `checkpoint_weights`' names, through the conversion's own mapping."""
    tensors = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    weights = {f"outer.{k}": v for k, v in hf_mapping.hf_outer_to_megatron(tensors, hf, padded_vocab).items()}
    for layer in range(hf.num_layers):
        weights.update({f"layer{layer}.{k}": v for k, v in hf.family.hf_layer_to_megatron(tensors, layer).items()})
    return weights


@pytest.mark.parametrize("name, micro_batch_size", [("orpo", 2), ("sigmoid", 2), ("simpo", 2), ("simpo", 1)],
                         ids=["orpo", "sigmoid", "simpo", "simpo_2_micro_batches"])
def test_three_steps_equal_trl_trainer(name, micro_batch_size, inputs, tmp_path):
    case = CASES[name]
    ours = run_ours(inputs, case, micro_batch_size, str(tmp_path / "ours"))
    trl, trainer = run_trl(inputs, case, micro_batch_size, str(tmp_path / "trl"))
    assert sorted(ours) == sorted(trl) == list(range(1, NUM_STEPS + 1))

    metrics = METRICS + (ORPO_METRICS if name == "orpo" else [])
    worst = {}
    for step in trl:
        # Ours logs the learning rate after the step's scheduler update, as Megatron-LM does (the next step's);
        # transformers logs the one the step used. Equal steps 2 and 3 show that both steps used the same.
        if step < NUM_STEPS:
            assert abs(ours[step]["lr"] - trl[step + 1]["learning_rate"]) <= 1e-9 * LR, (step, ours[step]["lr"])
        for metric in metrics:
            expected, got = trl[step][metric], ours[step][metric]
            # A difference of two metrics carries their rounding: relative to the larger of them.
            scale = max([abs(expected), 1e-3] + [abs(trl[step][term]) for term in DIFFERENCES.get(metric, ())])
            error = abs(got - expected) / scale
            worst[metric] = max(worst.get(metric, 0.0), error)
            assert error <= METRIC_TOL, (step, metric, got, expected)
    print(name, "metrics, max relative difference:", {k: f"{v:.1e}" for k, v in worst.items()})

    initial = checkpoint_weights(inputs["checkpoint"])
    final = checkpoint_weights(checkpointing.iteration_dir(str(tmp_path / "ours"), NUM_STEPS))
    info = checkpoint_format.describe(inputs["checkpoint"])
    reference = trl_weights_as_ours(trainer.model, info.hf, initial["outer." + hf_mapping.EMBEDDING].shape[0])
    assert sorted(reference) == sorted(final)
    errors = {}
    for key, weight in reference.items():
        expected, got = weight - initial[key], final[key] - initial[key]
        errors[key] = float((got - expected).norm() / expected.norm())
        assert errors[key] <= WEIGHT_TOL, (key, errors[key])
    print(name, "weights, max relative difference of an update:", f"{max(errors.values()):.1e}")
