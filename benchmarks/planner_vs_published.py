"""The capacity planner against the published runs of ../shared/reference/planner-published-runs.md.

    python benchmarks/planner_vs_published.py [--json-out FILE] [-- EXTRA ESTIMATOR FLAGS]

Puts every public row of that page through `tools/estimate_memory.py --json` (a fresh process each, the real
command line, default assumptions unless flags follow `--`) and prints predicted against measured, side by side,
with their ratio and the order of the layouts within each family of rows (one model on one cluster).

Measured figures are converted as the page says: a published TFLOP/s per GPU becomes tokens/s per GPU with
Megatron-LM's `num_floating_point_operations` of the row's date (full S x S attention before 2025-03-06,
Megatron-LM commit 8873b55d6a; causal half after), written out here from Megatron-LM's formula rather than taken
from the planner. The alignment-handbook row publishes a run time: pairs/s/GPU are compared, and its system
(FSDP, 8-bit Adam) is not the one the planner models; the planner's figure is the 8x22B example script's default
layout (examples/orpo_mixtral_8x22b.sh) on the same 32 GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "estimate_memory.py")
CONFIGS = os.path.join(REPO, "tools", "configs")

# The public rows. `flags`: the layout and workload as the estimator's flags; `published`: (kind, value).
PRETRAINING_8X7B = ["--hf-config", os.path.join(CONFIGS, "mixtral-8x7b.json"), "--workload", "pretraining",
                    "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "256"]


@dataclasses.dataclass(frozen=True)
class Row:
    family: str
    name: str
    gpus: int
    layout: str
    flags: list
    published: tuple  # ("tflops_full_attention", x) | ("tflops_causal", x) | ("pairs_per_second_per_gpu", x) | None
    source: str


ROWS = [
    Row("Mixtral-8x7B, 64 H100", "MCore v0.9", 64, "TP1 PP4 VP8 EP8 DP16",
        PRETRAINING_8X7B + ["--tp", "1", "--pp", "4", "--vp", "8", "--ep", "8", "--dp", "16"],
        ("tflops_full_attention", 468.0), "Megatron-LM moe/README.md, MCore v0.9"),
    Row("Mixtral-8x7B, 64 H100", "MCore v0.8", 64, "TP1 PP4 VP8 EP8 DP16",
        PRETRAINING_8X7B + ["--tp", "1", "--pp", "4", "--vp", "8", "--ep", "8", "--dp", "16"],
        ("tflops_full_attention", 438.0), "same README, MCore v0.8"),
    Row("Mixtral-8x7B, 64 H100", "EP4 TP2 (slower than EP8 TP1)", 64, "TP2 PP4 VP8 EP4 DP8",
        PRETRAINING_8X7B + ["--tp", "2", "--pp", "4", "--vp", "8", "--ep", "4", "--dp", "8"],
        None, "same README, layout comparison"),
    Row("Mixtral-8x22B ORPO, 32 H100", "zephyr-orpo-141b (FSDP) vs 8x22B script default", 32,
        "TP8 PP4 EP1 DP1, full recompute, offload 0.15",
        ["--hf-config", os.path.join(CONFIGS, "mixtral-8x22b.json"), "--tp", "8", "--pp", "4", "--ep", "1",
         "--dp", "1", "--recompute-granularity", "full", "--use-precision-aware-optimizer", "--optimizer-cpu-offload",
         "--optimizer-offload-fraction", "0.15", "--micro-batch-size", "1", "--global-batch-size", "32",
         "--max-length", "2048", "--save-interval", "100", "--async-save"],
        ("pairs_per_second_per_gpu", 6932 * 3 / 4771.96 / 32), "alignment-handbook all_results.json"),
]
# The measured order within a family, fastest first (the README's layout comparison).
MEASURED_ORDER = {"Mixtral-8x7B, 64 H100": ["TP1 PP4 VP8 EP8 DP16", "TP2 PP4 VP8 EP4 DP8"]}


def megatron_lm_training_flops_per_token(config: dict, seq_length: int, causal: bool, padded_vocab: int) -> float:
    """Megatron-LM's `num_floating_point_operations` / (batch x seq_length) for a Mixtral (GQA, SwiGLU, top-k
    routed experts, no shared experts): 3 (forward, two backward GEMMs) x 2 (FLOPs per multiply-add) x
    per layer [h (q + 2 kv) + q S (/2 when causal) x 2 + q h + h f k x 3] + the logits' h V."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    core_attention = q * seq_length / (2 if causal else 1) * 2
    per_layer = h * (q + 2 * kv) + core_attention + q * h + h * config["intermediate_size"] * config[
        "num_experts_per_tok"] * 3
    return 3 * 2 * (layers * per_layer + h * padded_vocab)


def measured(row: Row, config: dict) -> tuple[str, float] | None:
    """(unit, value) the row's published figure means, tokens/s/GPU for TFLOP/s figures."""
    if row.published is None:
        return None
    kind, value = row.published
    if kind == "pairs_per_second_per_gpu":
        return "pairs/s/GPU", value
    seq_length = int(row.flags[row.flags.index("--seq-length") + 1])
    vocab = -(-config["vocab_size"] // 128) * 128  # TP1 / TP2 padding alike for 32000
    per_token = megatron_lm_training_flops_per_token(config, seq_length, kind == "tflops_causal", vocab)
    return "tokens/s/GPU", value * 1e12 / per_token


def predict(row: Row, extra: list[str]) -> dict:
    completed = subprocess.run([sys.executable, TOOL, *row.flags, *extra, "--json"], capture_output=True, text=True,
                               cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    if completed.returncode != 0:
        raise RuntimeError(f"{row.name}: {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", default=None, help="Also write the rows as JSON to this file.")
    parser.add_argument("extra", nargs="*", help="Estimator flags added to every row (after --).")
    args = parser.parse_args(argv)
    results = []
    for row in ROWS:
        config = json.load(open(row.flags[row.flags.index("--hf-config") + 1]))
        prediction = predict(row, args.extra)
        truth = measured(row, config)
        unit = truth[0] if truth else "tokens/s/GPU"
        predicted = (prediction["pairs_per_second_per_gpu"] if unit == "pairs/s/GPU"
                     else prediction["tokens_per_second_per_gpu"])
        results.append({"family": row.family, "row": row.name, "gpus": row.gpus, "layout": row.layout,
                        "source": row.source, "published": row.published, "unit": unit,
                        "measured": truth[1] if truth else None, "predicted": predicted,
                        "ratio": predicted / truth[1] if truth else None,
                        "predicted_tflops_per_gpu": prediction["model_tflops_per_gpu"],
                        "gib_per_gpu": prediction["gib_per_gpu"], "fits": prediction["fits"],
                        "step_seconds": prediction["step_seconds"], "step_parts": prediction["step_parts"]})
    print(table(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def table(results: list[dict]) -> str:
    lines = ["| family | row | layout | published | measured | predicted | pred/meas | predicted TFLOP/s/GPU "
             "(causal) | predicted step s | GiB/GPU (fits) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        published = "ordering only" if r["published"] is None else (
            f"{r['published'][1]:.4g} " + {"tflops_full_attention": "TFLOP/s (full S x S)",
                                           "tflops_causal": "TFLOP/s (causal)",
                                           "pairs_per_second_per_gpu": "pairs/s/GPU"}[r["published"][0]])
        measured_value = "" if r["measured"] is None else f"{r['measured']:.4g} {r['unit']}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['family']} | {r['row']} | {r['layout']} | {published} | {measured_value} | "
                     f"{r['predicted']:.4g} {r['unit']} | {ratio} | {r['predicted_tflops_per_gpu']:.0f} | "
                     f"{r['step_seconds']:.3f} | {r['gib_per_gpu']:.1f} ({'yes' if r['fits'] else 'no'}) |")
    lines.append("")
    for family, order in MEASURED_ORDER.items():
        speed = {}
        for r in results:
            if r["family"] == family:
                speed.setdefault(r["layout"], r["predicted"])
        predicted_order = sorted(speed, key=speed.get, reverse=True)
        verdict = "same as measured" if predicted_order == order else "NOT the measured order"
        lines.append(f"rank order, {family}: measured {' > '.join(order)}; predicted "
                     f"{' > '.join(predicted_order)} ({verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
