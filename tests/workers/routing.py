"""Worker: each model's Megatron router vs transformers' router of its family on the same hidden states: top-k
selection and weights, and the load-balancing loss against transformers' `load_balancing_loss_func`. The models of
`--hf-dir` run in turn in one launch (Megatron's parallel state rebuilt between them)."""
import argparse
import json
import sys

import reference_weights
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from transformers import AutoModelForCausalLM

from orpo_megatron import parallel
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.rank_model import build_for_rank


def compare_routers(hf_dir: str) -> dict:
    hf = HFModelConfig.from_file(hf_dir)
    chunk = build_for_rank(hf, parallel.initialize({}, hf)).chunks[0]
    reference_weights.load_hf_checkpoint([chunk], hf_dir, hf)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load_balancing_loss_func = sys.modules[type(reference).__module__].load_balancing_loss_func

    hidden = torch.randn(64, 1, hf.hidden_size, generator=torch.Generator().manual_seed(7))  # [S, B, h]
    report = {}
    for layer in range(hf.num_layers):
        router = chunk.decoder.layers[layer].mlp.router
        with torch.no_grad():
            ref_logits, ref_weights, ref_indices = reference.model.layers[layer].mlp.gate(
                hidden.reshape(-1, hf.hidden_size))
        # Megatron's load-balancing loss is computed only when training with gradients; the tracker holds it
        # per layer without its coefficient.
        moe_utils.clear_aux_losses_tracker()
        router.train()
        probs, routing_map = router(hidden.clone().requires_grad_())
        tracked = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
        ref_map = torch.zeros_like(routing_map).scatter_(1, ref_indices, True)
        ref_probs = torch.zeros_like(probs).scatter_(1, ref_indices, ref_weights.to(probs.dtype))
        report[layer] = {
            "selection_equal": bool(torch.equal(routing_map, ref_map)),
            "weights_max_abs_diff": (probs - ref_probs).abs().max().item(),
            "experts_used": int(routing_map.any(0).sum()),
            "megatron_load_balancing_loss": tracked[router.layer_number - 1].item(),
            "transformers_load_balancing_loss": float(load_balancing_loss_func(
                (ref_logits,), hf.num_experts, hf.num_experts_per_tok)),
        }
    moe_utils.clear_aux_losses_tracker()
    parallel_state.destroy_model_parallel()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    reports = [compare_routers(hf_dir) for hf_dir in args.hf_dir]
    with open(args.out, "w") as f:
        json.dump(reports, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
