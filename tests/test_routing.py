"""Megatron's router, configured from the HF config, routes exactly as each family's HF router (Mixtral and
Qwen3-MoE with norm_topk_prob: softmax, top-k, renormalize; Qwen2-MoE: softmax, top-k), and its load-balancing
loss is transformers' per layer; and the routing config of FP8 grouped GEMMs."""
import json

import pytest

FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe"]


@pytest.fixture(scope="module")
def routing_reports(torchrun, tiny_mixtral, tiny_qwen3_moe, tiny_qwen2_moe, tmp_path_factory) -> dict:
    """Each family's per-layer router comparison, all in one launch."""
    out = tmp_path_factory.mktemp("routing") / "routing.json"
    torchrun("routing.py", 1, "--hf-dir", tiny_mixtral, tiny_qwen3_moe, tiny_qwen2_moe, "--out", str(out))
    return dict(zip(FAMILIES, json.loads(out.read_text())))


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_transformers_topk_and_weights(routing_reports, family):
    report = routing_reports[family]
    assert len(report) == (4 if family == "mixtral" else 2)
    for layer, result in report.items():
        assert result["selection_equal"], f"layer {layer}: top-k selection differs from HF"
        assert result["weights_max_abs_diff"] <= 1e-6, f"layer {layer}: {result}"
        # Non-trivial routing: tokens spread over several experts, so a wrong order of softmax/top-k would show.
        assert result["experts_used"] >= 3


# Both are Switch Transformer's E * sum_i f_i * P_i over softmax probabilities and top-k counts, but Megatron's f_i
# divides the counts by tokens x top-k (a fraction summing to 1) and transformers' by tokens only: per layer,
# transformers' = top-k x Megatron's. Over several layers they differ in kind: Megatron sums the per-layer losses,
# transformers pools the counts and probabilities of all layers before the product. Every family here trains with
# Megatron's, scaled by the config's `router_aux_loss_coef`.
LOAD_BALANCING_REL_TOL = 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_load_balancing_loss_is_transformers_per_layer(routing_reports, family):
    top_k = 2
    for layer, result in routing_reports[family].items():
        ours, theirs = result["megatron_load_balancing_loss"], result["transformers_load_balancing_loss"]
        assert abs(theirs - top_k) > 1e-3  # off the value of perfectly even routing (top-k): a real measurement
        assert abs(top_k * ours - theirs) <= LOAD_BALANCING_REL_TOL * theirs, (layer, result)


@pytest.mark.parametrize("fp8, grouped_gemm, dispatcher, padded", [
    ("hybrid", True, "alltoall", True),
    ("e4m3", True, "allgather", False),  # megatron-core refuses the padding there
    ("hybrid", False, "alltoall", False),  # SequentialMLP: no grouped GEMM to align
    (None, True, "alltoall", False),
])
def test_fp8_grouped_gemm_pads_the_routing_map_in_the_alltoall_dispatcher(tiny_mixtral, monkeypatch, fp8,
                                                                          grouped_gemm, dispatcher, padded):
    """With FP8 grouped GEMMs the alltoall dispatcher pads each expert's rows once per layer
    (`moe_router_padding_for_quantization`) instead of TEGroupedMLP padding them on every pass. FP8 configs need
    TE's version checks to pass: they answer "new enough" here, as on the TE spec; megatron-core's own check of
    the combination (the allgather dispatcher refuses the padding) runs."""
    from megatron.core.transformer import transformer_config

    from orpo_megatron.model_config import FusedKernels, HFModelConfig, PrecisionConfig, build_transformer_config

    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *args, **kwargs: True)
    config = build_transformer_config(HFModelConfig.from_file(tiny_mixtral),
                                      precision=PrecisionConfig(bf16=True, fp8_format=fp8),
                                      moe_token_dispatcher_type=dispatcher,
                                      kernels=FusedKernels(moe_grouped_gemm=grouped_gemm))
    assert config.moe_router_padding_for_quantization is padded
