"""`bash examples/orpo_tiny.sh` (the README's demo) runs end to end and the model learns the held-out preferences.

Shortened to 40 steps for CI (the README's set-up command runs the full 200). Checks: exit 0, the printed
before/after line agrees with metrics.jsonl, held-out reward accuracy and margin grow, the PNG is a PNG, and the
exported Hugging Face folder holds trained weights (different from the initial ones) under the HF names.
"""
import json
import os
import re
import subprocess

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):  # a single-file checkpoint (the fixture)
        return load_file(os.path.join(folder, "model.safetensors"))
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(os.path.join(folder, shard)))
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors


def test_tiny_demo_trains_exports_plots_and_improves_held_out_accuracy(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", "examples/orpo_tiny.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OUT=str(out), TRAIN_ITERS="40", PYTHONWARNINGS="ignore"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    line = re.search(r"held-out rewards/accuracies: ([\d.]+) before training -> ([\d.]+) after (\d+) steps; "
                     r"rewards/margins (-?[\d.]+) -> (-?[\d.]+)", proc.stdout)
    assert line, proc.stdout[-3000:]
    acc_before, acc_after, steps, margin_before, margin_after = (float(g) for g in line.groups())
    assert steps == 40
    evals = [e for e in map(json.loads, open(out / "train" / "metrics.jsonl")) if "eval/rewards/accuracies" in e]
    assert [e["iteration"] for e in evals] == [0, 40]
    assert round(evals[0]["eval/rewards/accuracies"], 3) == acc_before
    assert round(evals[-1]["eval/rewards/accuracies"], 3) == acc_after
    assert acc_after > acc_before and margin_after > margin_before

    png = out / "train" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    initial, trained = hf_tensors(str(out / "hf")), hf_tensors(str(out / "hf-trained"))
    assert sorted(trained) == sorted(initial)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in trained
    assert all(trained[name].shape == initial[name].shape for name in initial)
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert os.path.isfile(out / "hf-trained" / "tokenizer.model")
