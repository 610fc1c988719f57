"""Worker: the Megatron router of the tiny Mixtral vs transformers' MixtralTopKRouter on the same hidden states."""
import argparse
import json

import reference_weights
import torch
from transformers import AutoModelForCausalLM

from orpo_megatron import parallel
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.rank_model import build_for_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    hf = HFModelConfig.from_file(args.hf_dir)
    chunk = build_for_rank(hf, parallel.initialize({}, hf)).chunks[0]
    reference_weights.load_hf_checkpoint([chunk], args.hf_dir, hf)
    chunk.eval()
    reference = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()

    hidden = torch.randn(64, 1, hf.hidden_size, generator=torch.Generator().manual_seed(7))  # [S, B, h]
    report = {}
    with torch.no_grad():
        for layer in range(hf.num_layers):
            probs, routing_map = chunk.decoder.layers[layer].mlp.router(hidden)
            _, ref_weights, ref_indices = reference.model.layers[layer].mlp.gate(hidden.reshape(-1, hf.hidden_size))
            ref_map = torch.zeros_like(routing_map).scatter_(1, ref_indices, True)
            ref_probs = torch.zeros_like(probs).scatter_(1, ref_indices, ref_weights.to(probs.dtype))
            report[layer] = {
                "selection_equal": bool(torch.equal(routing_map, ref_map)),
                "weights_max_abs_diff": (probs - ref_probs).abs().max().item(),
                "experts_used": int(routing_map.any(0).sum()),
            }
    with open(args.out, "w") as f:
        json.dump(report, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
