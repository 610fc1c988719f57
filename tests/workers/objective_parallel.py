"""Worker: the ORPO objective on 2 processes, as TP2 (vocabulary split) and as DP2 (pairs split).

Reads the full logits and micro-batches the test wrote (`--inputs`), runs on this rank's share, and rank 0
writes what the test compares with its whole-vocabulary, whole-batch reference (`--out`):
- tp2/<case>: loss, per-pair values, finalized metrics and the gathered logits gradient, with the vocabulary
  split over a Megatron TP group of 2 (case "fp32", "bf16", and "tied_max": the global max sits on both ranks).
- dp2: each rank scores one micro-batch normalized by the counts of both (as the data iterator gives them); the
  summed loss, the metrics from all-reduced sums and both ranks' gradients.
- cpo/<name>: the same tp2 ("fp32" and "bf16" cases) and dp2 results for each of TRL's CPO-family configs.
"""
import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from orpo_megatron import cpu_backend
from orpo_megatron.data.micro_batch import padded_rows
from orpo_megatron.objective import GlobalNormalizers, ORPOConfig, orpo_loss


def micro_batch(batch: dict):
    return padded_rows(batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"],
                       list(range(batch["input_ids"].shape[0] // 2)))


def vocab_shard(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    width = full.shape[-1] // world_size
    return full[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)


def gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def run_tp2(full_logits: torch.Tensor, batch: dict, config: ORPOConfig) -> dict:
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = vocab_shard(full_logits, rank, parallel_state.get_tensor_model_parallel_world_size())
    output = orpo_loss(shard, micro_batch(batch), config)
    output.loss.backward()
    return {
        "loss": output.loss.item(),
        "pairs": {name: getattr(output.pairs, name)
                  for name in ("chosen_logps", "rejected_logps", "log_odds", "pair_loss", "chosen_nll")
                  if getattr(output.pairs, name) is not None},
        "metrics": output.sums.finalize(config),
        "grad": gather(shard.grad, dim=-1),
    }


def run_dp2(micro_batches: list, logits: list, config: ORPOConfig) -> dict:
    rank = dist.get_rank()
    # Each rank holds the whole vocabulary here: a TP group of one per rank.
    single_rank_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    batches = [micro_batch(batch) for batch in micro_batches]
    mine = logits[rank].clone().requires_grad_(True)
    normalizers = GlobalNormalizers.of_micro_batches(batches, config.nll_on_prompt)  # both ranks' counts
    output = orpo_loss(mine, batches[rank], config, normalizers, tp_group=single_rank_groups[rank])
    output.loss.backward()
    losses = [None] * dist.get_world_size()
    grads = [None] * dist.get_world_size()
    dist.all_gather_object(losses, output.loss.item())
    dist.all_gather_object(grads, mine.grad)
    return {
        "normalizers": (normalizers.num_pairs, normalizers.num_nll_tokens),
        "loss": sum(losses),
        "metrics": output.sums.all_reduce(dist.group.WORLD).finalize(config),
        "grads": grads,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cpu_backend.activate()
    dist.init_process_group(backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    inputs = torch.load(args.inputs)
    config = ORPOConfig(**inputs["config"])

    results = {"tp2": {case: run_tp2(logits, inputs["tp2_batch"], config)
                       for case, logits in inputs["tp2_logits"].items()}}
    results["dp2"] = run_dp2(inputs["dp2_batches"], inputs["dp2_logits"], config)
    results["cpo"] = {}
    for name, kwargs in inputs["cpo_configs"].items():
        cpo_config = ORPOConfig(inputs["config"]["vocab_size"], **kwargs)
        results["cpo"][name] = {
            "tp2": {case: run_tp2(inputs["tp2_logits"][case], inputs["tp2_batch"], cpo_config)
                    for case in ("fp32", "bf16")},
            "dp2": run_dp2(inputs["dp2_batches"], inputs["dp2_logits"], cpo_config),
        }
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
