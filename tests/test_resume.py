"""Training checkpoints resume exactly at the same layout, keep their Adam state at another, score the same anywhere.

Exactness: a run of 6 steps that saved at step 3, and a second run resumed from that step-3 checkpoint (its own
process, the same command), produce the same losses for steps 4-6 and the same final weights (fp32). The
learning rate is large and scheduled (warmup + cosine) so a lost Adam moment, scheduler step or data position
changes the losses by far more than the tolerance.

Layout change: the step-3 checkpoint of a 6-step run at TP2 resumed at EP2 x DP2 (another TP, EP and DP, and
another number of chained optimizers) continues like a straight 6-step run at EP2 x DP2: steps 4-6 within the
layout-invariance tolerance of test_training_layouts.py. Step 4's loss comes from the restored weights alone;
steps 5 and 6 show the optimizer state: restarting Adam cold at step 4 (measured once) changes step 5's loss by
7e-3 relative and its grad norm by 14%, far beyond the tolerance.

Scoring: a TP2 x PP2 checkpoint scored with `orpo_megatron.evaluate` at TP2 x PP2, at PP2 x VP2 (10 micro-batches,
the interleaved schedule's forward-only steady state) and at TP1 x PP1 gives the same metrics.
"""
import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import checkpoint_weights, trainer_signal_handlers_undone
from orpo_megatron import train
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
LOSS_TOLERANCE = 1e-6  # fp32, same layout
LAYOUT_TOLERANCE = 1e-4  # fp32, relative: test_training_layouts.py's FIVE_STEP_TOL
LAYOUTS = {"pp2": ["--pipeline-model-parallel-size", "2"], "ep2_dp2": ["--expert-model-parallel-size", "2"],
           "tp2": ["--tensor-model-parallel-size", "2"]}


@pytest.fixture(scope="module")
def converted(tiny_converted) -> str:
    return tiny_converted


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data_cache"))


def train_args(load: str, save: str, data_cache: str, *layout: str, iters: int = 6, warmup: int = 2) -> list[str]:
    return ["--load", load, "--save", save, "--data-path", DATA, "--data-cache-dir", data_cache,
            "--max-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-iters", str(iters), "--save-interval", "3", "--log-interval", "1",
            "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(warmup), *layout]


@pytest.fixture(scope="module")
def straight(torchrun, converted, data_cache, tmp_path_factory):
    """straight(name): the save folder of an uninterrupted 6-step run at layout LAYOUTS[name] (run once)."""
    runs = {}

    def run(name: str) -> str:
        if name not in runs:
            save = str(tmp_path_factory.mktemp(f"straight_{name}") / "train")
            torchrun("-m orpo_megatron.train", 2, *train_args(converted, save, data_cache, *LAYOUTS[name]))
            assert checkpointing.latest_iteration(save) == 6
            runs[name] = save
        return runs[name]

    return run


def step3_only(straight_save: str, target: str) -> None:
    """The step-3 checkpoint alone, as a run stopped after step 3 leaves it."""
    os.makedirs(target)
    shutil.copytree(checkpointing.iteration_dir(straight_save, 3), checkpointing.iteration_dir(target, 3))
    checkpoint_format.write_tracker(target, 3)


def steps(save_dir: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    return {row["iteration"]: row for row in rows if "train/loss" in row}


@pytest.mark.parametrize("layout", ["pp2", "ep2_dp2"])
def test_resumed_run_matches_straight_run_losses_and_weights(torchrun, straight, converted, data_cache, tmp_path,
                                                             layout):
    resumed = str(tmp_path / "resumed")
    step3_only(straight(layout), resumed)
    proc = torchrun("-m orpo_megatron.train", 2, *train_args(converted, resumed, data_cache, *LAYOUTS[layout]))
    output = proc.stdout + proc.stderr
    assert "resumed from iteration 3 (12 pairs consumed)" in output, output[-3000:]
    assert "resharded" not in output  # same layout: nothing to reshard, RNG restored too

    expected, got = steps(straight(layout)), steps(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and sorted(got) == [4, 5, 6]
    assert len({round(expected[i]["train/loss"], 4) for i in (3, 4, 5, 6)}) == 4, "losses do not move"
    for step in (4, 5, 6):
        assert abs(got[step]["train/loss"] - expected[step]["train/loss"]) <= LOSS_TOLERANCE, step

    final_straight = checkpoint_weights(checkpointing.iteration_dir(straight(layout), 6))
    final_resumed = checkpoint_weights(checkpointing.iteration_dir(resumed, 6))
    initial = checkpoint_weights(converted)
    assert final_straight.keys() == final_resumed.keys() == initial.keys()
    for name, value in final_straight.items():
        assert torch.allclose(value, final_resumed[name], rtol=0, atol=1e-6), name
    assert any(not torch.allclose(final_straight[name], initial[name]) for name in initial), "weights never moved"


def test_resume_at_another_layout_continues_with_the_saved_adam_state(torchrun, straight, converted, data_cache,
                                                                      tmp_path):
    resumed = str(tmp_path / "resumed")
    step3_only(straight("tp2"), resumed)
    proc = torchrun("-m orpo_megatron.train", 2, *train_args(converted, resumed, data_cache, *LAYOUTS["ep2_dp2"]))
    output = proc.stdout + proc.stderr
    assert "resumed from iteration 3 (12 pairs consumed)" in output, output[-3000:]
    assert "saved at layout [world=2 TP=2 PP=1 EP=1 DP=1 SP], at [world=2 TP=1 PP=1 EP=2 DP=2]" in output
    assert "optimizer state (Adam moments, main params, step) resharded" in output
    assert "start from zero" not in output

    expected, got = steps(straight("ep2_dp2")), steps(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train/loss", "train/grad_norm", "train/nll_loss"):
            relative = abs(got[step][key] - expected[step][key]) / abs(expected[step][key])
            assert relative <= LAYOUT_TOLERANCE, (step, key, got[step][key], expected[step][key])


def test_tp2_pp2_checkpoint_scores_the_same_at_tp1_pp1_pp2_vp2_and_with_experts_unsplit(torchrun, trained_tp2_pp2,
                                                                                         data_cache, tmp_path):
    """The checkpoint saved at TP2 x PP2 (experts split over TP2) scored at TP2 x PP2 with EP2 and expert-TP 1
    (parallel folding: each expert whole on its EP rank), at PP2 x VP2 and at TP1: the same ORPO metrics and
    per-pair log-probs."""
    assert checkpointing.latest_iteration(trained_tp2_pp2) == 1
    pairs = tmp_path / "pairs.jsonl"  # 40 pairs keep the scoring runs short
    pairs.write_text("".join(open(DATA).readlines()[:40]))

    def score(nproc: int, output: str, *layout: str) -> dict:
        torchrun("-m orpo_megatron.evaluate", nproc, "--load", trained_tp2_pp2, "--data-path", str(pairs),
                 "--data-cache-dir", data_cache, "--max-length", "64", "--max-prompt-length", "48",
                 "--micro-batch-size", "4", "--output", output, *layout)
        return json.load(open(output + ".summary.json"))

    at_tp2_pp2 = score(4, str(tmp_path / "tp2pp2.jsonl"), "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                       "--expert-tensor-parallel-size", "1")
    at_pp2_vp2 = score(2, str(tmp_path / "pp2vp2.jsonl"), "--pipeline-model-parallel-size", "2",
                       "--virtual-pipeline-model-parallel-size", "2")
    at_tp1 = score(1, str(tmp_path / "tp1.jsonl"))
    assert at_tp2_pp2["pairs"] == at_pp2_vp2["pairs"] == at_tp1["pairs"] == 40
    assert at_tp2_pp2["layout"] == "world=4 TP=2 PP=2 EP=2 ETP=1 DP=1 SP"
    metric_names = [k for k, v in at_tp1.items() if isinstance(v, float)]
    assert {"loss", "nll_loss", "rewards/accuracies", "rewards/margins", "log_odds_ratio"} <= set(metric_names)
    per_pair_tp1 = [json.loads(line) for line in open(tmp_path / "tp1.jsonl")]
    for name, summary in (("tp2pp2", at_tp2_pp2), ("pp2vp2", at_pp2_vp2)):
        for metric in metric_names:
            assert summary[metric] == pytest.approx(at_tp1[metric], rel=1e-5, abs=1e-6), (name, metric)
        per_pair = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        assert [a["index"] for a in per_pair] == [b["index"] for b in per_pair_tp1]
        for a, b in zip(per_pair, per_pair_tp1):
            assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=1e-5), name
            assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=1e-5), name


def test_freeze_router_keeps_router_weights_bit_identical_through_a_resume(torchrun, converted, data_cache, tmp_path,
                                                                          capsys):
    """`--freeze-router` with a CPO-family loss at EP2: a 4-step run and a run resumed from its step-3 checkpoint
    leave every router weight bit-identical to the converted checkpoint while the other weights move, and the
    resumed run's step 4 equals the straight run's (the frozen router's missing optimizer state resumes too)."""
    flags = ["--expert-model-parallel-size", "2", "--freeze-router", "--loss-type", "simpo", "--beta", "2.0",
             "--simpo-gamma", "0.3", "--cpo-alpha", "0.5"]
    straight_save, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    torchrun("-m orpo_megatron.train", 2, *train_args(converted, straight_save, data_cache, *flags, iters=4,
                                                         warmup=1))
    step3_only(straight_save, resumed)
    proc = torchrun("-m orpo_megatron.train", 2, *train_args(converted, resumed, data_cache, *flags, iters=4,
                                                                warmup=1))
    assert "resumed from iteration 3" in proc.stdout + proc.stderr
    unfrozen = train_args(converted, straight_save, data_cache, *[f for f in flags if f != "--freeze-router"])
    with trainer_signal_handlers_undone(), pytest.raises(SystemExit) as exit_info:
        train.cli(unfrozen)  # refused before any process group or model exists
    assert exit_info.value.code == 1
    assert "error: the checkpoint was saved with --freeze-router; resume with it" in capsys.readouterr().err

    expected, got = steps(straight_save), steps(resumed)
    assert abs(got[4]["train/loss"] - expected[4]["train/loss"]) <= LOSS_TOLERANCE
    assert "train/log_odds_ratio" not in expected[1] and "train/rewards/margins" in expected[1]  # CPOTrainer's names

    initial = checkpoint_weights(converted)
    routers = [name for name in initial if ".router." in name]
    assert routers
    for folder in (checkpointing.iteration_dir(straight_save, 4), checkpointing.iteration_dir(resumed, 4)):
        final = checkpoint_weights(folder)
        for name in routers:
            assert torch.equal(final[name], initial[name]), name
        moved = [name for name in initial if name not in routers and not torch.equal(final[name], initial[name])]
        assert len(moved) >= len(initial) - len(routers) - 2, moved  # all but possibly untouched embedding rows


def test_async_save_writes_the_same_checkpoints_while_training_goes_on(torchrun, straight, converted, data_cache,
                                                                       tmp_path):
    """`--async-save` at EP2 x DP2: the step-3 save is written in the background while step 4 trains, the `latest`
    pointer moves only after that, and both checkpoints are the synchronous run's byte for byte: every tensor
    file, metadata.json and hf_files/ identical; `.metadata` identical but for the ids torch draws per save and
    the folder; common.pt and train_state.json identical but for the flag itself and --save."""
    save = str(tmp_path / "train")
    out = torchrun("-m orpo_megatron.train", 2, *train_args(converted, save, data_cache, *LAYOUTS["ep2_dp2"],
                                                            "--async-save")).stdout
    step3 = checkpointing.iteration_dir(save, 3)
    scheduled = out.index(f"saving checkpoint {step3} in the background")
    assert scheduled < out.index("train iter 4/6") < out.index(f"saved checkpoint {step3}\n"), out
    assert checkpointing.latest_iteration(save) == 6
    expected_steps, got_steps = steps(straight("ep2_dp2")), steps(save)
    assert sorted(got_steps) == sorted(expected_steps) == [1, 2, 3, 4, 5, 6]
    for iteration in expected_steps:  # the same run, in the same order (the bytes below show the same state)
        assert got_steps[iteration]["train/loss"] == expected_steps[iteration]["train/loss"]

    for iteration in (3, 6):
        synchronous, background = (checkpointing.iteration_dir(root, iteration) for root in (straight("ep2_dp2"), save))
        files = sorted(os.path.relpath(os.path.join(folder, name), synchronous)
                       for folder, _, names in os.walk(synchronous) for name in names)
        assert files == sorted(os.path.relpath(os.path.join(folder, name), background)
                               for folder, _, names in os.walk(background) for name in names)
        assert sum(name.endswith(".distcp") for name in files) == 2  # one per rank
        for name in files:
            if name not in (".metadata", "common.pt", checkpointing.TRAIN_STATE_FILE):
                with open(os.path.join(synchronous, name), "rb") as a, open(os.path.join(background, name), "rb") as b:
                    assert a.read() == b.read(), (iteration, name)
        plans = [FileSystemReader(folder).read_metadata() for folder in (synchronous, background)]
        assert plans[0].state_dict_metadata == plans[1].state_dict_metadata
        assert plans[0].storage_data == plans[1].storage_data and plans[0].planner_data == plans[1].planner_data
        commons = [checkpoint_format.read_common(folder) for folder in (synchronous, background)]
        flags = [vars(common.pop("args")) for common in commons]
        assert (flags[0].pop("async_save"), flags[1].pop("async_save")) == (False, True)
        assert flags[0].pop("save") != flags[1].pop("save")
        assert flags[0] == flags[1] and torch_equal_tree(commons[0], commons[1]), iteration
        states = [json.load(open(os.path.join(folder, checkpointing.TRAIN_STATE_FILE)))
                  for folder in (synchronous, background)]
        for state in states:
            state["args"].pop("async_save"), state["args"].pop("save")
        assert states[0] == states[1]


def torch_equal_tree(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch_equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(torch_equal_tree(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def train_here(*argv: str) -> int:
    """The trainer in this process (world 1)."""
    from megatron.core import parallel_state

    from orpo_megatron import parallel

    if parallel_state.model_parallel_is_initialized():  # another test's one-process group (conversion)
        parallel.destroy()
    with trainer_signal_handlers_undone():
        return train.main(list(argv))


def test_exit_interval_and_exit_duration_stop_after_the_right_step_with_a_checkpoint(converted, data_cache, tmp_path,
                                                                                      capsys):
    """In this process at world 1: `--exit-interval 2` stops after step 2, saved, with status 3; the same command
    with `--exit-duration-in-mins` set below the start-up time stops after the first step it runs (3), saved; a
    plain resume trains on to the end, every step logged once."""
    save = str(tmp_path / "train")

    def run(*flags: str) -> int:
        return train_here(*train_args(converted, save, data_cache, *flags, iters=6))

    assert run("--exit-interval", "2") == train.EXIT_STOPPED_SAVED
    assert checkpointing.latest_iteration(save) == 2
    assert "stopped by --exit-interval 2 at iteration 2; 4 of 6 steps left" in capsys.readouterr().out
    assert run("--exit-duration-in-mins", "0.001") == train.EXIT_STOPPED_SAVED  # 60 ms
    assert checkpointing.latest_iteration(save) == 3
    assert "stopped by --exit-duration-in-mins 0.001 at iteration 3; 3 of 6 steps left" in capsys.readouterr().out
    assert run() == 0
    assert checkpointing.latest_iteration(save) == 6
    assert sorted(steps(save)) == [1, 2, 3, 4, 5, 6]


def test_finetune_starts_a_new_run_and_no_load_optim_restarts_adam(converted, data_cache, tmp_path, capsys):
    """In this process at world 1, from the step-3 checkpoint of a 6-step run:
    - `--finetune` starts at iteration 0 with a fresh optimizer, schedule and data order: its steps equal those of
      a run from the same weights with the training state removed (as converted weights are loaded);
    - without it the same --load resumes at iteration 4; with `--no-load-optim` step 4 (the restored weights and
      data position) equals the straight run's and step 5 does not (Adam restarted), `--no-load-rng` says so."""
    straight = str(tmp_path / "straight")
    assert train_here(*train_args(converted, straight, data_cache)) == 0
    step3 = checkpointing.iteration_dir(straight, 3)
    weights_only = str(tmp_path / "weights_only")
    shutil.copytree(step3, weights_only)
    os.remove(os.path.join(weights_only, checkpointing.TRAIN_STATE_FILE))

    finetuned, fresh = str(tmp_path / "finetuned"), str(tmp_path / "fresh")
    assert train_here(*train_args(step3, finetuned, data_cache, "--finetune", iters=2, warmup=1)) == 0
    assert train_here(*train_args(weights_only, fresh, data_cache, iters=2, warmup=1)) == 0
    assert sorted(steps(finetuned)) == [1, 2]
    for iteration in (1, 2):  # step 2 shows the optimizer: the checkpoint's Adam moments would move it
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert steps(finetuned)[iteration][key] == pytest.approx(steps(fresh)[iteration][key], rel=1e-6), key

    capsys.readouterr()
    restarted = str(tmp_path / "restarted")
    assert train_here(*train_args(step3, restarted, data_cache, "--no-load-optim", "--no-load-rng")) == 0
    out = capsys.readouterr().out
    assert "resumed from iteration 3" in out and "--no-load-optim: Adam starts anew" in out
    assert "--no-load-rng: the RNG state starts from --seed" in out
    expected, got = steps(straight), steps(restarted)
    assert sorted(got) == [4, 5, 6]
    assert got[4]["train/loss"] == pytest.approx(expected[4]["train/loss"], rel=LOSS_TOLERANCE)
    assert got[4]["train/lr"] == pytest.approx(expected[4]["train/lr"], rel=1e-12)  # the schedule continues
    assert abs(got[5]["train/loss"] - expected[5]["train/loss"]) > 1e-4 * abs(expected[5]["train/loss"])
