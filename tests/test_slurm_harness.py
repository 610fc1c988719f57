"""The CI SLURM cluster (.ci/slurm/start.sh) runs multi-task GPU jobs, and our launcher reads SLURM's env.

Skipped unless SLURM_CONF is set (CI runs `bash .ci/slurm/start.sh` and sources its env file first).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from orpo_megatron.parallel import cuda_device_index, launch_env

pytestmark = pytest.mark.skipif(
    not os.environ.get("SLURM_CONF"), reason="no SLURM cluster (start one with: bash .ci/slurm/start.sh)"
)

# Each task dumps the environment SLURM gave it to its own file (a bare interpreter starts fast; four torch
# imports on a 2-core runner take a minute); launch_env() then reads each task's real environment here.
TASK_REPORT = ("import json, os; json.dump(dict(os.environ), "
               "open('task' + os.environ['SLURM_PROCID'] + '.json', 'w'))")


def run_task_report_job(tmp_path, resources: str, before_srun: str = "") -> tuple[str, list[dict]]:
    """Run a job of `resources` (#SBATCH options) whose tasks dump their environment: (job output, task envs)."""
    output = tmp_path / "job.out"
    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH {resources} --time=00:05:00\n#SBATCH --output={output}\n{before_srun}"
                      f"srun --chdir={tmp_path} {sys.executable} -c \"{TASK_REPORT}\"\n")
    # sbatch exports the submitting environment; a torchrun rendezvous there would mask SLURM's.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], capture_output=True, text=True,
                          timeout=180, env=env, cwd=str(tmp_path))
    log = output.read_text() if output.exists() else "(no job output)"
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {proc.stderr}\n{log}"
    return log, [json.loads(path.read_text()) for path in sorted(tmp_path.glob("task*.json"))]


def test_sbatch_runs_four_gpu_tasks_and_launch_env_reads_ranks_and_master(tmp_path):
    # SLURM's own expansion of the node list: the reference for the master host.
    log, task_envs = run_task_report_job(
        tmp_path, "--nodes=1 --ntasks-per-node=4 --gpus-per-node=4",
        'echo "FIRST_HOST $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"\n')
    lines = log.splitlines()
    first_host = [line.split()[1] for line in lines if line.startswith("FIRST_HOST ")]
    tasks = sorted(
        ({"procid": int(env["SLURM_PROCID"]), "gpus_on_node": env.get("SLURM_GPUS_ON_NODE"),
          "cuda_visible": env.get("CUDA_VISIBLE_DEVICES"), **dataclasses.asdict(launch_env(env))}
         for env in task_envs),
        key=lambda t: t["procid"],
    )
    assert len(first_host) == 1 and first_host[0], log
    assert [t["procid"] for t in tasks] == [0, 1, 2, 3], log
    assert [t["rank"] for t in tasks] == [0, 1, 2, 3]
    assert sorted(t["local_rank"] for t in tasks) == [0, 1, 2, 3]
    assert {t["world_size"] for t in tasks} == {4}
    assert {t["launcher"] for t in tasks} == {"slurm"}
    assert {t["master_addr"] for t in tasks} == {first_host[0]}
    assert len({t["master_port"] for t in tasks}) == 1, "ranks disagree on the rendezvous port"
    # The fake GPUs are allocated as real gres: 4 per node, visible to every task.
    assert {t["gpus_on_node"] for t in tasks} == {"4"}, log
    assert {t["cuda_visible"] for t in tasks} == {"0,1,2,3"}, log


def test_per_task_gpu_binding_gives_each_task_a_device_it_can_see(tmp_path):
    """`--gpus-per-task=1`: each task sees one GPU; the device index must be within what it sees (local rank 1
    as an ordinal would be invalid there)."""
    log, tasks = run_task_report_job(tmp_path, "--nodes=1 --ntasks=2 --gpus-per-task=1")
    assert len(tasks) == 2, log
    for task in tasks:
        visible = task["CUDA_VISIBLE_DEVICES"].split(",")
        local_rank = launch_env(task).local_rank
        assert len(visible) == 1, task["CUDA_VISIBLE_DEVICES"]
        assert cuda_device_index(local_rank, len(visible)) == 0
    assert max(launch_env(task).local_rank for task in tasks) >= 1  # so the local rank alone would be out of range
