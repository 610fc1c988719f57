"""Rank, world and rendezvous come from torchrun's or SLURM's environment, so `srun python -m ...` works."""
import pytest

from orpo_megatron.parallel import first_slurm_host, launch_env


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
