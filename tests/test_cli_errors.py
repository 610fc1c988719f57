"""Bad flags and layouts stop the trainer at start-up with one clear message, a non-zero exit, no traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest


def run_train(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orpo_megatron.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_fp8_without_transformer_engine_or_gpu_exits_with_what_to_install(tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", "--bf16",
                     "--fp8-format", "hybrid")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--fp8-format hybrid" in proc.stderr
    assert ("no CUDA device" in proc.stderr) or ("pip install 'orpo-megatron[fp8]'" in proc.stderr)


def test_fp8_needs_bf16():
    proc = run_train("--load", "x", "--data-path", "y", "--fp8-format", "e4m3")
    assert proc.returncode == 2 and "--fp8-format needs --bf16" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "3"], "world size 1 is not divisible by TP*PP = 3*1 = 3"),
    (["--expert-model-parallel-size", "0"], "--expert-model-parallel-size must be >= 1"),
    (["--max-length", "128", "--max-prompt-length", "200"], "--max-prompt-length must be in [0, --max-length)"),
])
def test_wrong_flags_are_named(flags, message, tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", *flags)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_warmup_longer_than_training_is_named(tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", "--train-iters", "2",
                     "--lr-warmup-iters", "2", "--max-length", "256", "--max-prompt-length", "192")
    assert proc.returncode != 0
    assert "--lr-warmup-iters 2 must be smaller than the LR decay length 2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_named(tmp_path):
    proc = run_train("--load", str(tmp_path / "nothing"), "--data-path", "examples/data/plain.jsonl")
    assert proc.returncode != 0
    assert "nothing: no such checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case,expected", [
    ("first_format", "python tools/convert_hf.py upgrade --load"),
    ("megatron_lm_without_config", "pass --hf-config"),
    ("wrong_config", "num_hidden_layers: "),
])
def test_unusable_checkpoints_are_named_before_any_work(tiny_converted, tiny_mixtral, tmp_path, case, expected):
    load, extra = str(tmp_path / "ckpt"), []
    if case == "first_format":
        os.makedirs(load)
        with open(os.path.join(load, "metadata.json"), "w") as f:
            json.dump({"format": "orpo-megatron-model-weights", "format_version": 1}, f)
    else:  # a checkpoint as Megatron-LM leaves it: no hf_files/ of ours
        shutil.copytree(os.path.join(tiny_converted, "release"), load)
        shutil.rmtree(os.path.join(load, "hf_files"))
    if case == "wrong_config":
        config = json.load(open(os.path.join(tiny_mixtral, "config.json")))
        os.makedirs(tmp_path / "hf")
        json.dump(dict(config, num_hidden_layers=6), open(tmp_path / "hf" / "config.json", "w"))
        extra = ["--hf-config", str(tmp_path / "hf")]
    proc = run_train("--load", load, *extra, "--data-path", "examples/data/plain.jsonl")
    assert proc.returncode != 0
    assert expected in proc.stderr and load in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
