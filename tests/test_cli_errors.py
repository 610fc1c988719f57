"""Bad flags, layouts and checkpoints stop the trainer at start-up with one clear message, a non-zero exit, no
traceback; and the start-up checks of the GPU backend (Transformer Engine version, FP8 hardware) decide right for
any machine."""
import ast
import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import trainer_signal_handlers_undone
from orpo_megatron.model import TRANSFORMER_ENGINE_SUPPORTED, backend_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, process: bool = False) -> subprocess.CompletedProcess:
    """The trainer's command line, in this process unless `process` (each subprocess spends seconds importing
    torch and megatron-core): its exit status and stderr as a process would give them, an escaping exception as
    the traceback Python would print. In-process cases must stop before torch.distributed starts."""
    from orpo_megatron import train

    if process:
        return subprocess.run([sys.executable, "-m", "orpo_megatron.train", *args], capture_output=True, text=True,
                              timeout=300)

    group_before = torch.distributed.is_initialized()  # conversion's one-process group, from an earlier test
    stderr, returncode = io.StringIO(), 0
    try:
        with trainer_signal_handlers_undone(), contextlib.redirect_stderr(stderr):
            train.cli(list(args))
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # noqa: BLE001 - reported as the process would report it
        stderr.write(traceback.format_exc())
        returncode = 1
    assert torch.distributed.is_initialized() == group_before, "this case started torch.distributed: pass process=True"
    return subprocess.CompletedProcess(["orpo_megatron.train", *args], returncode, "", stderr.getvalue())


def test_fp8_without_transformer_engine_or_gpu_exits_with_what_to_install(tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", "--bf16",
                     "--fp8-format", "hybrid")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--fp8-format hybrid" in proc.stderr
    assert ("no CUDA device" in proc.stderr) or ("pip install 'orpo-megatron[te]'" in proc.stderr)


def test_fp8_needs_bf16():
    proc = run_train("--load", "x", "--data-path", "y", "--fp8-format", "e4m3")
    assert proc.returncode == 2 and "--fp8-format needs --bf16" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "3"], "world size 1 is not divisible by TP*PP = 3*1 = 3"),
    (["--expert-model-parallel-size", "0"], "--expert-model-parallel-size must be >= 1"),
    (["--max-length", "128", "--max-prompt-length", "200"], "--max-prompt-length must be in [0, --max-length)"),
    (["--no-packing", "--packed-length", "512"], "--packed-length 512 needs packing (no --no-packing)"),
])
def test_wrong_flags_are_named(flags, message, tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", *flags)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_warmup_longer_than_training_is_named(tiny_converted):
    proc = run_train("--load", tiny_converted, "--data-path", "examples/data/plain.jsonl", "--train-iters", "2",
                     "--lr-warmup-iters", "2", "--max-length", "256", "--max-prompt-length", "192", process=True)
    assert proc.returncode != 0
    assert "--lr-warmup-iters 2 must be smaller than the LR decay length 2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_named(tmp_path):
    proc = run_train("--load", str(tmp_path / "nothing"), "--data-path", "examples/data/plain.jsonl")
    assert proc.returncode != 0
    assert "nothing: no such checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--bf16", "--optimizer-cpu-offload"], "--optimizer-cpu-offload needs --use-precision-aware-optimizer"),
    (["--use-precision-aware-optimizer"], "--use-precision-aware-optimizer needs --bf16"),
    (["--bf16", "--exp-avg-dtype", "bf16"], "--exp-avg-dtype bf16 needs --use-precision-aware-optimizer"),
    (["--bf16", "--use-precision-aware-optimizer", "--optimizer-cpu-offload", "--exp-avg-sq-dtype", "fp8"],
     "--exp-avg-sq-dtype fp8 cannot be used with --optimizer-cpu-offload"),
    (["--bf16", "--use-precision-aware-optimizer"], "needs a CUDA GPU with transformer-engine installed"),
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--overlap-param-gather", "--no-overlap-grad-reduce"], "--overlap-param-gather needs --overlap-grad-reduce"),
    (["--eval-iters", "0"], "--eval-iters must be >= 1, got 0"),
    (["--exit-interval", "0"], "--exit-interval must be >= 1, got 0"),
    (["--exit-duration-in-mins", "-5"], "--exit-duration-in-mins must be >= 0, got -5.0"),
    (["--async-save"], "--async-save needs --save"),
    (["--expert-tensor-parallel-size", "0"], "--expert-tensor-parallel-size must be >= 1, got 0"),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2", "--eval-iters", "3"],
     "--eval-iters 3 must be a multiple of --pipeline-model-parallel-size 2"),
])
def test_optimizer_and_communication_modes_that_cannot_work_are_named(flags, message, capsys):
    from orpo_megatron import train

    with pytest.raises(SystemExit) as exit_info:  # argparse's error: usage line, exit 2, before any work
        train.parse_args(["--load", "x", "--data-path", "y", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bf16, packing, cuda, te, expected", [
    (None, True, True, True, True),  # a GPU with TE: bf16, how the model is trained
    (None, True, True, False, True),  # a GPU on Megatron's local spec
    (None, True, False, False, False),  # CPU: fp32, the CPU tests' and demo's exact numbers
    (True, True, False, False, True),
    (False, True, True, True, "--no-bf16 (fp32) with packed rows (the default) has no attention kernel"),
    (False, False, True, True, False),  # padded rows: TE's unfused attention takes fp32
    (False, True, True, False, False),  # the local spec's attention masks packed rows in any dtype
])
def test_precision_defaults_to_bf16_on_a_gpu_and_refuses_fp32_packed_rows_on_te(bf16, packing, cuda, te, expected):
    from orpo_megatron.arguments import resolve_bf16

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            resolve_bf16(bf16, packing, cuda, te)
        assert "--no-packing" in str(error.value)
    else:
        assert resolve_bf16(bf16, packing, cuda, te) is expected


@pytest.mark.parametrize("module", ["train", "evaluate"])
@pytest.mark.parametrize("flags, bf16", [([], False), (["--bf16"], True), (["--bf16", "--no-bf16"], False)])
def test_bf16_flag_resolves_for_this_cpu_machine(module, flags, bf16):
    import importlib

    extra = ["--output", "o.jsonl"] if module == "evaluate" else []
    args = importlib.import_module(f"orpo_megatron.{module}").parse_args(["--load", "x", "--data-path", "y",
                                                                          *extra, *flags])
    assert args.bf16 is bf16


H100, A100 = (9, 0), (8, 0)


@pytest.mark.parametrize("fp8, cuda, te, capability, expected", [
    ("hybrid", True, "2.10.0", H100, None),
    (None, True, "2.9.0", A100, None),  # bf16 on an A100 with a supported TE
    ("e4m3", True, "2.11.0", A100, "needs compute capability 8.9+ (Ada, Hopper or newer); this GPU has 8.0"),
    ("hybrid", True, None, H100, "needs NVIDIA Transformer Engine, which is not installed"),
    ("hybrid", False, None, None, "this machine has no CUDA device"),
    (None, True, "2.12.0", H100, "transformer-engine 2.12.0 is installed, but megatron-core 0.16.1 supports"),
    (None, True, "2.8.0", H100, "transformer-engine 2.8.0 is installed"),
    (None, False, "2.12.0", None, None),  # no GPU: TE is never used
])
def test_backend_checks_decide_for_any_machine(fp8, cuda, te, capability, expected):
    problems = backend_problems(fp8, cuda, te, capability)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def setup_requirements() -> dict[str, Requirement]:
    """The requirements setup.py declares (install_requires and every extra), by package name."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    listed = ast.literal_eval(kwargs["install_requires"])
    for extra in ast.literal_eval(kwargs["extras_require"]).values():
        listed += extra
    return {Requirement(r).name: Requirement(r) for r in listed}


def test_torch_and_transformer_engine_pins_follow_megatron_core():
    ours = setup_requirements()
    theirs = {Requirement(r).name: Requirement(r) for r in importlib.metadata.requires("megatron-core")}
    assert ours["transformer-engine"].specifier == theirs["transformer-engine"].specifier
    assert SpecifierSet(",".join(TRANSFORMER_ENGINE_SUPPORTED)) == theirs["transformer-engine"].specifier
    assert ours["torch"].specifier == theirs["torch"].specifier


def test_router_runs_without_transformer_engine_outside_the_cpu_backend():
    # A GPU machine without TE never activates the CPU backend; the router's TE GEMM name must still be bound.
    code = (
        "import torch, orpo_megatron.model\n"
        "from orpo_megatron import cpu_backend\n"
        "from megatron.core.transformer.moe.moe_utils import router_gating_linear\n"
        "assert not cpu_backend.is_active()\n"
        "x, w = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)\n"
        "out = router_gating_linear(x, w, None, torch.float32)\n"
        "assert out.dtype == torch.float32 and torch.allclose(out, x.float() @ w.float().t())\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


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


def test_evaluator_refuses_the_training_only_packed_length(capsys):
    from orpo_megatron import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--load", "x", "--data-path", "y", "--output", "o", "--packed-length", "512"])
    assert exit_info.value.code == 2
    assert "--packed-length packs training steps" in capsys.readouterr().err
