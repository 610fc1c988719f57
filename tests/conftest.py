"""Shared test fixtures: tiny HF models written once per session, and torchrun launching."""
import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from orpo_megatron import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """A tiny random Mixtral HF folder (fp32) with the tiny tokenizer."""
    return tiny_model.write_tiny_model(str(tmp_path_factory.mktemp("tiny_mixtral")), seed=1234)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """The dense member of the family: same tiny shapes, no experts."""
    return tiny_model.write_tiny_model(str(tmp_path_factory.mktemp("tiny_mistral")), seed=4321, dense=True)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> str:
    """A tiny random Qwen3-MoE HF folder (fp32, top-k weights renormalized) with the tiny byte-level tokenizer."""
    return tiny_model.write_tiny_qwen_moe(str(tmp_path_factory.mktemp("tiny_qwen3_moe")), "qwen3_moe", seed=2024)


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory) -> str:
    """A tiny random Qwen2-MoE HF folder (fp32, shared expert, QKV biases, top-k weights not renormalized)."""
    return tiny_model.write_tiny_qwen_moe(str(tmp_path_factory.mktemp("tiny_qwen2_moe")), "qwen2_moe", seed=2025)


def convert(hf_dir: str, out: str, dtype: str) -> str:
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "hf-to-megatron",
                    "--hf-dir", hf_dir, "--output", out, "--dtype", dtype], check=True, capture_output=True, cwd=REPO)
    return out


@pytest.fixture(scope="session")
def tiny_converted(tiny_mixtral, tmp_path_factory) -> str:
    """The tiny Mixtral converted to our checkpoint format by the real tool."""
    return convert(tiny_mixtral, str(tmp_path_factory.mktemp("tiny_converted") / "ckpt"), "fp32")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_converted(tiny_qwen3_moe, tmp_path_factory) -> str:
    """The tiny Qwen3-MoE converted to our checkpoint format in this process (the tool's own function)."""
    from orpo_megatron.checkpoint import conversion

    return conversion.hf_to_megatron(tiny_qwen3_moe, str(tmp_path_factory.mktemp("tiny_qwen3_moe_converted") / "ckpt"),
                                     progress=False)


@pytest.fixture(scope="session")
def tiny_converted_bf16(tiny_mixtral, tmp_path_factory) -> str:
    """The tiny Mixtral converted with --dtype bf16, as the GPU job converts its model."""
    return convert(tiny_mixtral, str(tmp_path_factory.mktemp("tiny_converted_bf16") / "ckpt"), "bf16")


@pytest.fixture(scope="session")
def trained_tp2_pp2(tiny_converted, tmp_path_factory) -> str:
    """A training save folder: the converted tiny Mixtral after one step at TP2 x PP2 (world 4, the trainer's
    own command line), saved as iteration 1."""
    root = tmp_path_factory.mktemp("trained_tp2_pp2")
    save = str(root / "train")
    run_torchrun("-m orpo_megatron.train", 4, "--load", tiny_converted, "--save", save,
                 "--data-path", os.path.join(REPO, "examples", "data", "capybara_style.jsonl"),
                 "--data-cache-dir", str(root / "data_cache"), "--max-length", "64", "--max-prompt-length", "48",
                 "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3",
                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    return save


def checkpoint_weights(path: str) -> dict:
    """Every stored model tensor of a checkpoint (a folder or a tracker root), full and unpadded, by layer."""
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.checkpoint import weights as checkpoint_weights
    from orpo_megatron.checkpoint import conversion

    conversion.init_single_process()  # the full-tensor readers go through dist_checkpointing
    info = checkpoint_format.describe(path)
    stored = checkpoint_weights.stored_tensors(info.folder)
    weights = {f"outer.{k}": v for k, v in checkpoint_weights.read_outer(info.folder, info.hf, stored).items()}
    for layer in range(info.hf.num_layers):
        tensors = checkpoint_weights.read_layer(info.folder, info.hf, layer, stored)
        weights.update({f"layer{layer}.{k}": v for k, v in tensors.items()})
    return weights


@contextlib.contextmanager
def trainer_signal_handlers_undone():
    """Around an in-process call of the trainer: gives pytest back the SIGTERM / SIGUSR1 handlers its StopSignal
    installs."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 600, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run `tests/workers/<script>` (or a module with `-m`) under torchrun with `nproc` CPU processes."""
    target = ["-m", script[3:]] if script.startswith("-m ") else [os.path.join(WORKERS, script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *target, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun
