"""The trainer's optimizer in each mode: what it asks megatron-core for, what a checkpoint of it holds, and a
resumed offloading optimizer continuing as an uninterrupted one (one process, bf16, the tiny Mixtral).

- `optimizer.optimizer_config` for every mode the trainer allows (the precision-aware optimizer without offload is
  TE's FusedAdam, only built on a GPU with TE): whole fp32 main params, never TE's int16 remainders, which the
  fully_reshardable load cannot take back.
- The saved fully_reshardable state holds fp32 main params that round to the model's bf16 weights.
- `--optimizer-cpu-offload` with a fraction of 0.5 (a host part and a device part, as the CPU backend splits it):
  resumed at step 2, what each sub-optimizer reads at its next step (its param groups as the hybrid optimizer
  syncs them, per-parameter steps, where its state lives) and the weights after each of 4 more steps equal the
  uninterrupted run's; with torch's AdamW as the device part (no TE here) and with a device part that keeps its
  step in its param group as TE's FusedAdam does (without the fix its weights differ from step 4 on).
- Host copies are re-pinned in place; state is placed on its parameter's device (pinning and a CUDA device part
  themselves only exist on a GPU: `acceptance/gpu.py` resumes the offloaded optimizer there).
"""
import argparse

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from orpo_megatron import optimizer as optimizers
from orpo_megatron.checkpoint import format as fmt
from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.checkpoint import training as checkpointing
from orpo_megatron.checkpoint import conversion
from orpo_megatron.model_config import PrecisionConfig
from orpo_megatron.parallel import ParallelLayout
from orpo_megatron.rank_model import build_for_rank

OFFLOAD = ["--use-precision-aware-optimizer", "--optimizer-cpu-offload"]
MODES = {  # the modes the trainer allows, with dtype flags unlike their defaults where a mode takes them
    "plain": [],
    "precision_aware": ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "fp16",
                        "--main-grads-dtype", "bf16"],
    "precision_aware_fp16_main": ["--use-precision-aware-optimizer", "--main-params-dtype", "fp16"],
    "offload": OFFLOAD,
    "offload_half": OFFLOAD + ["--optimizer-offload-fraction", "0.5", "--main-grads-dtype", "bf16"],
}
RUNS_HERE = ("plain", "offload", "offload_half")  # without TE: not the FusedAdam ones
LR, STEPS_BEFORE, STEPS_AFTER = 1e-3, 2, 4


def flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    optimizers.add_optimizer_args(parser)
    args = parser.parse_args(argv)
    args.lr, args.min_lr = LR, 0.0
    return args


@pytest.mark.parametrize("name", MODES)
def test_optimizer_config_keeps_whole_fp32_main_params(name, monkeypatch):
    from megatron.core.optimizer import OptimizerConfig

    if name not in RUNS_HERE:  # megatron-core's checks import TE's FusedAdam: see the config as passed
        monkeypatch.setattr(OptimizerConfig, "__post_init__", lambda config: None)
    args = flags(MODES[name])
    mode = optimizers.OptimizerMode.from_args(args)
    assert not mode.problems(bf16=True)
    config = optimizers.optimizer_config(args, True, torch.bfloat16)
    assert config.store_param_remainders is False
    assert config.use_precision_aware_optimizer == mode.precision_aware
    assert (config.optimizer_cpu_offload, config.optimizer_offload_fraction) == (mode.offload, mode.offload_fraction)
    assert (config.main_params_dtype, config.main_grads_dtype, config.exp_avg_dtype, config.exp_avg_sq_dtype) == tuple(
        optimizers.DTYPES[getattr(args, f)] for f in ("main_params_dtype", "main_grads_dtype", "exp_avg_dtype",
                                                      "exp_avg_sq_dtype"))


class Run:
    """The trainer's bf16 model, DDP, optimizer (its flags) and a cosine schedule, on seeded random gradients."""

    def __init__(self, info, argv: list[str]):
        args = flags(argv)
        built = build_for_rank(info.hf, ParallelLayout(), precision=PrecisionConfig(bf16=True))
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=optimizers.grad_reduce_in_fp32(args),
                                            use_distributed_optimizer=True)
        self.chunks = [DistributedDataParallel(built.config, ddp, chunk) for chunk in built.modules]
        self.optimizer = optimizers.build_optimizer(args, self.chunks, True, torch.bfloat16)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=LR, min_lr=0.0, lr_warmup_steps=1, lr_decay_steps=8,
            lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=8, wd_incr_style="constant")

    def step(self, iteration: int) -> None:
        generator = torch.Generator().manual_seed(iteration)
        for param in self.chunks[0].parameters():
            param.main_grad.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        applied, _, _ = self.optimizer.step()
        assert applied
        self.scheduler.step(1)

    def weights(self) -> dict:
        return {name: param.detach().clone() for name, param in self.chunks[0].named_parameters()}


def save(run: Run, info, folder: str, iteration: int) -> None:
    megatron_args = fmt.megatron_args(info.hf, {}, padded_vocab_size=640, make_vocab_size_divisible_by=128,
                                      iteration=iteration)
    checkpointing.save(folder, iteration, run.chunks, run.optimizer, run.scheduler, {"layout": "one"},
                       megatron_args, hf_files_from=info.hf_files)


def saved_main_params(folder: str) -> dict:
    """The saved optimizer's main params ("optimizer.state.param.<model key>"), full, by model key."""
    prefix = "optimizer.state.param."
    stored = checkpoint_weights.stored_tensors(fmt.iteration_dir(folder, fmt.read_tracker(folder)))
    requests = {key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype),
                                                     replica_id=0)
                for key, meta in stored.items() if key.startswith(prefix) or prefix + key in stored}
    loaded = dist_checkpointing.load(requests, fmt.iteration_dir(folder, fmt.read_tracker(folder)),
                                     validate_access_integrity=False)
    return {key[len(prefix):]: (loaded[key], loaded[key[len(prefix):]]) for key in requests if key.startswith(prefix)}


@pytest.mark.parametrize("name", RUNS_HERE)
def test_saved_main_params_are_fp32_and_round_to_the_weights(name, tiny_converted_bf16, tmp_path):
    conversion.init_single_process()
    info = fmt.describe(tiny_converted_bf16)
    run = Run(info, MODES[name])
    checkpoint_weights.load_model_weights(info, run.chunks)
    for iteration in range(1, STEPS_BEFORE + 1):
        run.step(iteration)
    save(run, info, str(tmp_path), STEPS_BEFORE)
    pairs = saved_main_params(str(tmp_path))
    assert len(pairs) >= 10, sorted(pairs)
    below_bf16 = 0
    for key, (main, weight) in pairs.items():
        assert main.dtype == torch.float32 and weight.dtype == torch.bfloat16, (key, main.dtype, weight.dtype)
        assert torch.equal(main.to(torch.bfloat16), weight), key
        below_bf16 += int((main != main.to(torch.bfloat16).float()).sum())
    assert below_bf16 > 0, "the main params hold nothing below bf16's precision: not fp32 main params"


def hybrid_view(optimizer) -> list[dict]:
    """What each sub-optimizer of the offloading optimizer reads at its next step: its param groups once the
    hybrid optimizer has synced its own into them (the first thing its step does), each parameter's step, and
    whether every state tensor is on its parameter's device."""
    found = []
    for hybrid in optimizers.hybrid_optimizers(optimizer):
        hybrid._sync_hdo_param_groups_to_sub_optimizers()
        subs = []
        for sub in hybrid.sub_optimizers:
            params = [p for group in sub.param_groups for p in group["params"]]
            subs.append({
                "device_part": sub is hybrid.gpu_optimizer,
                "groups": [{k: v for k, v in group.items() if k != "params"} for group in sub.param_groups],
                "steps": [float(sub.state[p]["step"]) for p in params if "step" in sub.state[p]],
                "state_beside_params": all(value.device == p.device for p in params
                                           for value in sub.state[p].values() if torch.is_tensor(value)),
                "master_params": [p.detach().clone() for p in params],
            })
        found.append({"groups": [{k: v for k, v in group.items() if k != "params"} for group in hybrid.param_groups],
                      "subs": subs})
    return found


def assert_same_view(got: list[dict], expected: list[dict], where: str) -> None:
    assert len(got) == len(expected) >= 1, where
    for hybrid_got, hybrid_expected in zip(got, expected):
        assert hybrid_got["groups"] == hybrid_expected["groups"], where
        assert [s["device_part"] for s in hybrid_got["subs"]] == [s["device_part"] for s in hybrid_expected["subs"]]
        for sub_got, sub_expected in zip(hybrid_got["subs"], hybrid_expected["subs"]):
            assert sub_got["groups"] == sub_expected["groups"], where
            assert sub_got["steps"] == sub_expected["steps"], where
            assert sub_got["state_beside_params"], where
            for mine, theirs in zip(sub_got["master_params"], sub_expected["master_params"]):
                assert torch.equal(mine, theirs), where


class GroupStepAdamW(torch.optim.Optimizer):
    """The device part as Transformer Engine's FusedAdam keeps it (TE 2.9-2.11 `fused_adam.py`, `step()`): one step
    count per param group, set to 1 or incremented at the start of each step and used for the bias correction; the
    moments created as zeros in a parameter's empty state; AdamW's update of fp32 params (no master weights, as
    megatron-core's hybrid optimizer builds it: it steps fp32 copies). Its arithmetic is torch's, not TE's kernel:
    the comparison is between two runs of this same class."""

    def __init__(self, params):
        super().__init__(params, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group["step"] + 1 if "step" in group else 1
            beta1, beta2 = group["betas"]
            correction1, correction2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if len(state) == 0:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(group["eps"])
                update = state["exp_avg"] / correction1 / denom + group["weight_decay"] * param
                param.sub_(group["lr"] * update)


@pytest.fixture(params=["torch_adamw", "te_like_group_step"])
def device_part(request, monkeypatch):
    """The offloading optimizer's device part: torch's AdamW (no TE or Apex: this machine), or the TE-like one,
    which megatron-core builds when TE imports (its `Adam`), with its checkpoint code on TE's branches."""
    if request.param == "te_like_group_step":
        from megatron.core import optimizer as megatron_optimizer
        from megatron.core.optimizer import distrib_optimizer

        monkeypatch.setattr(megatron_optimizer, "Adam", GroupStepAdamW)
        monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    return request.param


def test_offloaded_optimizer_resumes_as_an_uninterrupted_one(device_part, tiny_converted_bf16, tmp_path):
    conversion.init_single_process()
    info = fmt.describe(tiny_converted_bf16)
    straight = Run(info, MODES["offload_half"])
    checkpoint_weights.load_model_weights(info, straight.chunks)
    for iteration in range(1, STEPS_BEFORE + 1):
        straight.step(iteration)
    save(straight, info, str(tmp_path), STEPS_BEFORE)
    expected = {STEPS_BEFORE: (hybrid_view(straight.optimizer), straight.weights())}
    for iteration in range(STEPS_BEFORE + 1, STEPS_BEFORE + STEPS_AFTER + 1):
        straight.step(iteration)
        expected[iteration] = (hybrid_view(straight.optimizer), straight.weights())
    (hybrid,) = optimizers.hybrid_optimizers(straight.optimizer)
    assert hybrid.gpu_optimizer is not None and hybrid.cpu_optimizers, "no device part and host part to compare"
    assert isinstance(hybrid.gpu_optimizer, GroupStepAdamW) == (device_part == "te_like_group_step")

    resumed = Run(info, MODES["offload_half"])
    state = checkpointing.load(checkpointing.resolve(str(tmp_path)), resumed.chunks, resumed.optimizer,
                               resumed.scheduler, "one")
    assert state["iteration"] == STEPS_BEFORE
    for iteration in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER + 1):
        if iteration > STEPS_BEFORE:
            resumed.step(iteration)
        view, weights = expected[iteration]
        assert_same_view(hybrid_view(resumed.optimizer), view, f"iteration {iteration}")
        for key, weight in resumed.weights().items():
            assert torch.equal(weight, weights[key]), (iteration, key)
    moved = sum(not torch.equal(expected[STEPS_BEFORE][1][k], w) for k, w in resumed.weights().items())
    assert moved > 10, "the steps after the resume did not move the weights: a blind comparison"


def test_state_is_placed_on_its_parameters_device():
    """megatron-core places a sub-optimizer's state by its class (`_move_new_state_to_right_device`), which sends
    the device part's to the host when both parts are torch's AdamW. Here a 'meta' parameter stands in for a
    device one (this machine has no GPU): its state follows it, the host one's stays."""
    host, device = torch.zeros(4), torch.zeros(4, device="meta")
    adam = torch.optim.AdamW([host, device])
    for param in (host, device):
        adam.state[param] = {"exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4), "step": torch.tensor(3.0)}
    optimizers.place_state_beside_params(adam)
    assert {value.device.type for value in adam.state[device].values()} == {"meta"}
    assert {value.device.type for value in adam.state[host].values()} == {"cpu"}


def test_host_copies_are_pinned_in_place(tiny_converted_bf16):
    """The offloading optimizer's host params are replaced by what `pin` returns (on a GPU: `pin_memory()`),
    keeping the objects its maps are keyed by and their values."""
    conversion.init_single_process()
    info = fmt.describe(tiny_converted_bf16)
    run = Run(info, MODES["offload_half"])
    (hybrid,) = optimizers.hybrid_optimizers(run.optimizer)
    host = [p for sub in hybrid.cpu_optimizers for group in sub.param_groups for p in group["params"]]
    before = [(p.data_ptr(), p.detach().clone()) for p in host]
    pinned = []
    optimizers.pin_host_copies(hybrid, pin=lambda tensor: pinned.append(tensor.clone()) or pinned[-1])
    assert len(pinned) == len(host) > 0
    for param, copy, (old_ptr, value) in zip(host, pinned, before):
        assert param in hybrid.cpu_copys_map_gpu_param and param in hybrid.inner_param_to_orig_param
        assert param.data_ptr() == copy.data_ptr() != old_ptr
        assert torch.equal(param, value)
