"""Megatron-LM reads our checkpoints and we read Megatron-LM's, at other layouts; shown with megatron-core alone.

1. The checkpoint the trainer saved at TP2 x PP2 (conftest's `trained_tp2_pp2`) loads at EP2 x DP2 into a GPTModel
   on megatron-core's stock layer spec the way Megatron-LM's `load_checkpoint` loads it
   (workers/megatron_interop.py --mode read: `dist_checkpointing.load` at Megatron-LM's default strictness, which
   fails on any key it asks for and does not find, then a strict `load_state_dict`), and gives transformers'
   logits for the same checkpoint exported to HF.
2. A checkpoint written by plain megatron-core the way Megatron-LM's `save_checkpoint` writes one (--mode write,
   TP2 x EP2: model, dp_reshardable optimizer, RNG, scheduler, args in common.pt; the stock local spec, so the
   MoE pre-MLP norm under that spec's name), given the model's HF config.json and tokenizer: exports to HF
   bit-identical to the weights it was made from, scores with `orpo_megatron.evaluate` exactly as the
   converted HF model does, trains here as a new run (its first step equal to a run from the converted HF model
   at the same layout), and refuses a config.json that contradicts its stored arguments.
"""
import json
import os
import shutil

import pytest
import torch

from test_convert import hf_tensors, run_cli, succeeded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")


@pytest.fixture(scope="module")
def interop(tiny_mixtral, tiny_converted, trained_tp2_pp2, torchrun, tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("interop"))
    tokens = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, os.path.join(root, "tokens.pt"))
    out = {"root": root, "tokens": tokens}

    read_dir = os.path.join(root, "read")
    os.makedirs(read_dir)
    torchrun("megatron_interop.py", 2, "--mode", "read", "--hf-dir", tiny_mixtral, "--root", trained_tp2_pp2,
             "--ep", "2", "--tokens", os.path.join(root, "tokens.pt"), "--out", read_dir)
    mlm = os.path.join(root, "megatron_lm")
    torchrun("megatron_interop.py", 4, "--mode", "write", "--hf-dir", tiny_mixtral, "--root", mlm, "--tp", "2",
             "--ep", "2")
    wrong = os.path.join(root, "wrong_config")
    shutil.copytree(tiny_mixtral, wrong)
    config = json.load(open(os.path.join(wrong, "config.json")))
    json.dump(dict(config, num_local_experts=8, rope_theta=10000.0), open(os.path.join(wrong, "config.json"), "w"))
    out.update(run_cli({
        "export_trained": ["megatron-to-hf", "--load", trained_tp2_pp2, "--output", os.path.join(root, "hf_trained")],
        "export_mlm": ["megatron-to-hf", "--load", mlm, "--hf-config", tiny_mixtral,
                       "--output", os.path.join(root, "hf_mlm")],
        "export_mlm_without_config": ["megatron-to-hf", "--load", mlm, "--output", os.path.join(root, "bad_1")],
        "export_mlm_wrong_config": ["megatron-to-hf", "--load", mlm, "--hf-config", wrong,
                                    "--output", os.path.join(root, "bad_2")],
    }, os.path.join(root, "cli")))

    pairs = os.path.join(root, "pairs.jsonl")
    with open(pairs, "w") as f:
        f.writelines(open(DATA).readlines()[:24])
    data = ["--data-path", pairs, "--data-cache-dir", os.path.join(root, "data_cache"), "--max-length", "64",
            "--max-prompt-length", "48"]
    for name, load in (("mlm", [mlm, "--hf-config", tiny_mixtral]), ("converted", [tiny_converted])):
        torchrun("-m orpo_megatron.evaluate", 1, "--load", *load, *data, "--micro-batch-size", "4",
                 "--output", os.path.join(root, f"scores_{name}.jsonl"))
        out[f"train_{name}"] = torchrun(
            "-m orpo_megatron.train", 2, "--load", *load, *data, "--save", os.path.join(root, f"train_{name}"),
            "--expert-model-parallel-size", "2", "--global-batch-size", "4", "--train-iters", "1",
            "--eval-fraction", "0", "--log-interval", "1", "--lr", "1e-3")
    out["mlm"] = mlm
    return out


def transformers_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return reference.eval()(tokens).logits


def test_our_tp2_pp2_checkpoint_loads_into_megatron_core_stock_spec_at_ep2(interop):
    succeeded(interop["export_trained"])
    ours = torch.load(os.path.join(interop["root"], "read", "logits.pt"))
    reference = transformers_logits(os.path.join(interop["root"], "hf_trained"), interop["tokens"])
    assert ours.shape == reference.shape == (2, 16, 600)
    assert (ours - reference).abs().max().item() <= 1e-4  # fp32


def test_megatron_lm_checkpoint_exports_bit_identical(interop, tiny_mixtral):
    succeeded(interop["export_mlm"])
    original, exported = hf_tensors(tiny_mixtral), hf_tensors(os.path.join(interop["root"], "hf_mlm"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(interop["root"], "hf_mlm", name)), name


@pytest.mark.parametrize("case,expected", [
    ("export_mlm_without_config", ["iter_0000010 has no hf_files/config.json", "--hf-config"]),
    ("export_mlm_wrong_config", ["does not describe the model of", "common.pt",
                                 "rope_theta: ", "has 10000, the checkpoint 1000000",
                                 "num_local_experts: ", "has 8, the checkpoint 4"]),
])
def test_megatron_lm_checkpoint_needs_its_own_config(interop, case, expected):
    result = interop[case]
    assert result["rc"] != 0 and all(text in result["stderr"] for text in expected), result["stderr"]


def test_megatron_lm_checkpoint_scores_as_the_model_it_holds(interop):
    root = interop["root"]
    mlm = [json.loads(line) for line in open(os.path.join(root, "scores_mlm.jsonl"))]
    converted = [json.loads(line) for line in open(os.path.join(root, "scores_converted.jsonl"))]
    assert len(mlm) == 24 and mlm == converted  # the same weights at the same layout: identical numbers


def test_megatron_lm_checkpoint_trains_here_as_a_new_run(interop):
    output = interop["train_mlm"].stdout + interop["train_mlm"].stderr
    assert "iter_0000010" in output and "resumed" not in output, output[-3000:]
    metrics = {}
    for name in ("mlm", "converted"):
        rows = [json.loads(line) for line in open(os.path.join(interop["root"], f"train_{name}", "metrics.jsonl"))]
        (metrics[name],) = [row for row in rows if "train/loss" in row]
    assert metrics["mlm"]["iteration"] == 1
    for key in ("train/loss", "train/grad_norm", "train/nll_loss", "train/log_odds_chosen"):
        assert metrics["mlm"][key] == metrics["converted"][key], key
