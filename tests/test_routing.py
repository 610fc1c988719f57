"""Megatron's router, configured from the HF config, routes exactly as HF Mixtral: softmax, top-k, renormalize;
and the routing config of FP8 grouped GEMMs."""
import json

import pytest


def test_router_matches_transformers_topk_and_weights(torchrun, tiny_mixtral, tmp_path):
    out = tmp_path / "routing.json"
    torchrun("routing.py", 1, "--hf-dir", tiny_mixtral, "--out", str(out))
    report = json.loads(out.read_text())
    assert len(report) == 4
    for layer, result in report.items():
        assert result["selection_equal"], f"layer {layer}: top-k selection differs from HF"
        assert result["weights_max_abs_diff"] <= 1e-6, f"layer {layer}: {result}"
        # Non-trivial routing: tokens spread over several experts, so a wrong order of softmax/top-k would show.
        assert result["experts_used"] >= 3


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
