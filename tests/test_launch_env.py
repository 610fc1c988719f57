"""Launch: rank, world and rendezvous from torchrun's or SLURM's environment (so `srun python -m ...` works),
the GPU each process takes, the environment Megatron-LM requires, the Transformer Engine decision, and the
first rank tokenizing before anything distributed starts."""
import glob
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import trainer_signal_handlers_undone
from orpo_megatron import model, parallel
from orpo_megatron.parallel import connections_problem, cuda_device_index, first_slurm_host, launch_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")


@pytest.mark.parametrize("nodelist, host", [
    ("node17", "node17"),
    ("gpu[003-005,010]", "gpu003"),
    ("gpu[12,14],login1", "gpu12"),
    ("a-b-c[7-9]", "a-b-c7"),
])
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_environment_gives_rank_world_and_master():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "hpc[040-043]", "SLURM_JOB_ID": "123456"}
    launch = launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 1)
    assert launch.master_addr == "hpc040"
    assert launch.master_port == 20000 + 123456 % 20000
    assert launch.launcher == "slurm"


def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    launch = launch_env(env)
    assert (launch.rank, launch.world_size, launch.master_addr, launch.master_port) == (1, 2, "10.0.0.1", 1234)
    assert launch.launcher == "torchrun"


def test_no_launcher_means_one_process():
    launch = launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist, host", [
    ("node[01-04]-ib", "node01-ib"),
    ("rack[1-2]-gpu[01-08]", "rack1-gpu01"),
    ("gpu[003-005,010]-ib,login1", "gpu003-ib"),
])
def test_first_host_of_node_lists_with_suffixes_and_several_ranges(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.skipif(shutil.which("scontrol") is None or not os.environ.get("SLURM_CONF"),
                    reason="no SLURM client and configuration (bash .ci/slurm/start.sh, then source its env file)")
def test_first_host_is_the_first_of_scontrol_show_hostnames():
    # SLURM's own expansion; it needs no such nodes to exist. Slurm 22.05 refuses text after the last bracket
    # ("Invalid hostlist: node[01-04]-ib"), so those lists are compared only where it accepts them.
    compared = []
    for nodelist in ("rack[1-2]-gpu[01-08]", "node[01-04]-ib", "gpu[003-005,010]-ib,login1", "a-b-c[7-9]",
                     "node17", "gpu[12,14],login1"):
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if "Invalid hostlist" in expanded.stderr:  # with exit status 0 and nothing on stdout
            continue
        assert expanded.returncode == 0, expanded.stderr
        assert first_slurm_host(nodelist) == expanded.stdout.split()[0], (nodelist, expanded.stdout)
        compared.append(nodelist)
    assert "rack[1-2]-gpu[01-08]" in compared and len(compared) >= 4, compared


@pytest.mark.parametrize("local_rank, visible, device", [(5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_device_is_the_local_rank_among_the_visible_devices(local_rank, visible, device):
    # --gpus-per-task=1 shows each task one device: every task then uses index 0, never its local rank.
    assert cuda_device_index(local_rank, visible) == device


@pytest.mark.parametrize("tp, major, value, refused", [
    (2, 9, None, True),       # Hopper, TP 2, unset: Megatron-LM asserts
    (8, 8, "8", True),        # Ampere, set to something else
    (2, 9, "1", False),
    (1, 9, None, False),      # no tensor parallelism
    (2, 10, None, False),     # Blackwell: Megatron-LM dropped the requirement
    (2, None, None, False),   # CPU
])
def test_cuda_device_max_connections_is_required_where_megatron_lm_requires_it(tp, major, value, refused):
    environ = {} if value is None else {"CUDA_DEVICE_MAX_CONNECTIONS": value}
    problem = connections_problem(tp, major, environ)
    assert (problem is not None) == refused
    if refused:
        assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in problem and "\n" not in problem


def launcher_lines(text: str) -> list[str]:
    """Shell commands (continuations joined) that start the trainer or the evaluator."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines()
            if re.search(r"\b(torchrun|torch\.distributed\.run|srun)\b|orpo_megatron\.(train|evaluate)\b", line)
            and not line.lstrip().startswith(("#", "echo"))]


def test_every_documented_launcher_sets_cuda_device_max_connections():
    readme = open(os.path.join(REPO, "README.md")).read()
    commands = launcher_lines("\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.S | re.M)))
    assert any("orpo_megatron.evaluate" in line for line in commands), commands
    for line in commands:
        assert line.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 "), line
    for script in glob.glob(os.path.join(REPO, "examples", "*.sh")):
        text = open(script).read()
        launches = launcher_lines(text)
        if not launches or all(line.startswith("exec bash") for line in launches):
            continue  # no launcher, or one that runs another script
        assert re.search(r"^export CUDA_DEVICE_MAX_CONNECTIONS=\$\{CUDA_DEVICE_MAX_CONNECTIONS:-1\}$", text, re.M), script


def test_broken_transformer_engine_is_not_chosen(tmp_path, monkeypatch):
    """A TE that is installed but fails to import (built against another torch): found by its name, refused by
    megatron-core's real import, so the local spec is used."""
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('transformer_engine_torch.so: undefined symbol')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs_name = "megatron.core.models.gpt.gpt_layer_specs"
    import megatron.core.models.gpt as gpt_package
    for name in ("transformer_engine", specs_name):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(gpt_package, "gpt_layer_specs", gpt_package.gpt_layer_specs)  # restored afterwards
    assert importlib.util.find_spec("transformer_engine") is not None
    importlib.import_module(specs_name)  # megatron-core's import, under the broken TE
    assert model.transformer_engine_importable() is False


class Initialized(Exception):
    """Raised by the recording stand-in for `parallel.initialize`: what came before it is what is tested."""


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_first_rank_tokenizes_before_any_process_group_or_cuda(entry, tiny_converted, tmp_path, monkeypatch):
    """datasets.map(num_proc=N) forks: the real entry tokenizes every split it reads into the cache before it
    starts torch.distributed (and with it CUDA and NCCL), never after."""
    from orpo_megatron import evaluate, train
    from orpo_megatron.data import pipeline

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    calls = []
    # Earlier tests in this process may have left a one-process group (conversion's): a group started by the
    # entry shows as a recorded init_process_group call, whatever the state it found.
    group_before = dist.is_initialized()

    def tokenize_dataset(*args, **kwargs):
        files_before = set(os.listdir(cache)) if cache.exists() else set()
        tokenized = real_tokenize(*args, **kwargs)
        calls.append(("tokenize", set(os.listdir(cache)) - files_before, dist.is_initialized() != group_before,
                      torch.cuda.is_initialized()))
        return tokenized

    def initialize(*args, **kwargs):
        calls.append(("initialize",))
        raise Initialized

    def init_process_group(*args, **kwargs):
        calls.append(("init_process_group",))
        return real_init_process_group(*args, **kwargs)

    real_tokenize, real_init_process_group = pipeline.tokenize_dataset, dist.init_process_group
    monkeypatch.setattr(pipeline, "tokenize_dataset", tokenize_dataset)
    monkeypatch.setattr(parallel, "initialize", initialize)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    argv = ["--load", tiny_converted, "--data-path", DATA, "--data-cache-dir", str(cache), "--max-length", "64",
            "--max-prompt-length", "48", "--data-num-workers", "2"]
    argv += (["--eval-fraction", "0.2", "--train-iters", "1"] if entry == "train"
             else ["--output", str(tmp_path / "scores.jsonl")])
    with trainer_signal_handlers_undone(), pytest.raises(Initialized):
        (train if entry == "train" else evaluate).main(argv)
    assert [call[0] for call in calls] == ["tokenize", "initialize"], calls
    _, written, process_group, cuda = calls[0]
    assert written and not process_group and not cuda  # it wrote the cache, before either started
