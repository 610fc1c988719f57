"""Worker: two optimizer steps of the trainer's optimizer against torch's reference AdamW, on the tiny model.

The trainer's step on CPU goes through shortcuts of the CPU backend and `optimizer.py` (DP collectives skipped over
one process, clipping in place, torch's fused AdamW kernel). Here the same gradients go through a plain
`torch.optim.AdamW(foreach=False, fused=False)` on fp32 copies of the parameters, clipped by hand to the global
norm of the DP-averaged gradients (Megatron's rule: scale by clip / (norm + 1e-6) when that is below 1); each rank
records how far the model's parameters and the grad norm are from that reference after each step.
"""
import argparse

import torch
import torch.distributed as dist
from layout_runs import measure_layouts, optimizer_flags
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from orpo_megatron import optimizer as optimizers, parallel
from orpo_megatron.model_config import HFModelConfig, PrecisionConfig
from orpo_megatron.rank_model import build_for_rank

LAYOUTS = {"fp32": False, "bf16": True}  # name -> bf16 (the data-parallel size is the world size)
LR, CLIP, STEPS, PAIRS, SEQ = 1e-2, 1.0, 2, 2, 16
GRAD_SCALE = 100.0  # makes the gradient norm well above CLIP, so clipping is exercised
EPS = 1e-4  # near the clipped gradients' size: Adam's update then depends on their scale, so on clipping


class AdamReference:
    """torch's loop AdamW on fp32 copies of the parameters."""

    def __init__(self, params: dict, args: argparse.Namespace):
        self.params = {name: param.detach().float().clone().requires_grad_() for name, param in params.items()}
        self.adam = torch.optim.AdamW(list(self.params.values()), lr=LR, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_eps, weight_decay=0.0, foreach=False, fused=False)

    def step(self, grads: dict, scale: float) -> None:
        for name, param in self.params.items():
            param.grad = grads[name] * scale
        self.adam.step()

    def error(self, params: dict) -> float:
        """Largest difference from the model's parameters, relative to each tensor's largest value; bf16
        parameters are the fp32 main parameters rounded, so they are compared with the reference rounded."""
        return max(((params[name].detach().float() - ref.detach().to(params[name].dtype).float()).abs().max()
                    / ref.detach().abs().max()).item() for name, ref in self.params.items())


def measure(hf_dir: str, name: str) -> dict:
    bf16 = LAYOUTS[name]
    args = optimizer_flags(["--clip-grad", str(CLIP), "--adam-eps", str(EPS)], lr=LR)
    hf = HFModelConfig.from_file(hf_dir)
    built = build_for_rank(hf, parallel.initialize({}, hf), precision=PrecisionConfig(bf16=bf16))
    config = built.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=optimizers.grad_reduce_in_fp32(args),
                                               use_distributed_optimizer=True)
    (chunk,) = [DistributedDataParallel(config, ddp_config, module)
                for module in built.modules]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = optimizers.build_optimizer(args, [chunk], bf16, config.params_dtype)

    params = dict(chunk.module.named_parameters())
    references = {clipped: AdamReference(params, args) for clipped in (True, False)}
    world = dist.get_world_size()
    generator = torch.Generator().manual_seed(100 + dist.get_rank())  # each DP rank its own batch
    steps = []
    for _ in range(STEPS):
        chunk.zero_grad_buffer()
        optimizer.zero_grad()
        ids = torch.randint(0, hf.vocab_size, (2 * PAIRS, SEQ), generator=generator)
        positions = torch.arange(SEQ).expand(2 * PAIRS, SEQ)
        logits = chunk(ids, positions, attention_mask=None)
        (logits.float().square().mean() * GRAD_SCALE).backward()

        # This rank's gradients, averaged over DP by hand: the references' gradients.
        grads = {name: param.main_grad.detach().float().clone() for name, param in params.items()}
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        finalize_model_grads([chunk])
        applied, grad_norm = optimizers.step_if_finite(optimizer)  # the trainer's step

        reference_norm = torch.sqrt(sum(grad.double().square().sum() for grad in grads.values())).item()
        for clipped, reference in references.items():
            reference.step(grads, min(1.0, CLIP / (reference_norm + 1e-6)) if clipped else 1.0)
        steps.append({"applied": bool(applied), "grad_norm": float(grad_norm), "reference_norm": reference_norm,
                      "param_max_rel_error": references[True].error(params),
                      "param_max_rel_error_vs_unclipped": references[False].error(params)})
    fused = [group.get("fused") for inner in getattr(optimizer, "chained_optimizers", [optimizer])
             for group in inner.optimizer.param_groups]
    parallel_state.destroy_model_parallel()
    return {"layout": name, "world": world, "steps": steps, "fused_groups": fused}


def main() -> None:
    measure_layouts(LAYOUTS, measure)


if __name__ == "__main__":
    main()
