"""The benchmarks' model (`packing.py`, `orpo_vs_trl.py`), as overrides of `orpo_megatron.tiny_model`'s tiny
Mixtral: Mixtral's vocabulary, 8 experts top-2 and 8/2 heads, tiny elsewhere, so the output layer and the expert
routing weigh as they do at full scale."""
BENCH_MIXTRAL_OVERRIDES = {
    "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 4096,
}
