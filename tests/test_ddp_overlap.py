"""Overlapped gradient reduction and parameter all-gather (on by default on a GPU) change no number.

At EP2 x DP2 with 4 micro-batches per rank and small buckets (many reduce-scatters and all-gathers per step), a
run with --overlap-grad-reduce --overlap-param-gather logs the same train and held-out losses and saves the same
weights at every checkpoint as the same run without them. The step-2 checkpoint is saved with no forward pass
after the step (no evaluation there), so it holds the updated weights only if the trainer completes the deferred
all-gather itself; a missed or partial gradient reduction would change the losses.
"""
import json
import os

import torch

from conftest import checkpoint_weights
from orpo_megatron.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")


def test_overlapped_communication_gives_the_same_run(torchrun, tiny_converted, tmp_path):
    def train(save: str, *flags: str) -> dict[int, dict]:
        torchrun("-m orpo_megatron.train", 2, "--load", tiny_converted, "--save", save, "--data-path", DATA,
                 "--data-cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--max-prompt-length", "48",
                 "--expert-model-parallel-size", "2", "--global-batch-size", "8", "--train-iters", "3",
                 "--save-interval", "2", "--lr", "1e-3", "--eval-fraction", "0.1", "--eval-interval", "3",
                 "--eval-iters", "2", "--log-interval", "1", "--ddp-bucket-size", "20000", *flags)
        rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
        return {(row["iteration"], "eval/loss" in row): row for row in rows if "train/loss" in row or "eval/loss" in row}

    plain = train(str(tmp_path / "plain"), "--no-overlap-grad-reduce", "--no-overlap-param-gather")
    overlapped = train(str(tmp_path / "overlapped"), "--overlap-grad-reduce", "--overlap-param-gather")
    assert plain.keys() == overlapped.keys() == {(1, False), (2, False), (3, False), (0, True), (3, True)}
    for key, row in plain.items():
        for name in ("train/loss", "train/grad_norm", "eval/loss"):
            if name in row:
                assert abs(overlapped[key][name] - row[name]) <= 1e-6, (key, name, overlapped[key][name], row[name])
    for iteration in (2, 3):
        expected = checkpoint_weights(checkpointing.iteration_dir(str(tmp_path / "plain"), iteration))
        got = checkpoint_weights(checkpointing.iteration_dir(str(tmp_path / "overlapped"), iteration))
        assert expected.keys() == got.keys()
        for name, value in expected.items():
            assert torch.allclose(got[name], value, rtol=0, atol=1e-6), (iteration, name)
