"""Model FLOPs per token against torch's count of the matmuls of a real forward/backward; throughput figures."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.throughput import FlopsCounter, forward_flops_per_sequence, peak_tflops_for, training_flops


def counted_flops(model_dir: str, batch: int, seq_length: int, backward: bool) -> float:
    """FLOPs of every matmul torch dispatches in transformers' model (eager attention and experts), with the
    attention products (its only batched matmuls) counted half: eager attention computes the whole S x S under
    the causal mask, Megatron-LM counts the causal half."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", experts_implementation="eager")
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_length),
                              generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=input_ids, labels=input_ids if backward else None)
        if backward:
            out.loss.backward()
    attention = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    return counter.get_total_flops() - attention / 2


@pytest.mark.parametrize("model", ["tiny_mixtral", "tiny_mistral", "tiny_qwen3_moe", "tiny_qwen2_moe"])
def test_flops_equal_counted_matmul_flops_of_transformers_forward_and_backward(model, request):
    """Exact: both sides count only matmuls, and every routed token runs exactly top-k experts."""
    model_dir = request.getfixturevalue(model)
    hf = HFModelConfig.from_file(model_dir)
    batch, seq_length = 3, 37
    assert counted_flops(model_dir, batch, seq_length, backward=False) == batch * forward_flops_per_sequence(
        hf, seq_length)
    assert counted_flops(model_dir, batch, seq_length, backward=True) == training_flops(hf, batch, seq_length)


def test_real_sequence_flops_are_transformers_counted_flops_of_each_sequence_alone(tiny_mixtral):
    """A packed row's model FLOPs: each real sequence at its own length, as if run alone (padding and the
    attention a packed row masks out are not model work)."""
    hf = HFModelConfig.from_file(tiny_mixtral)
    lengths = [5, 17, 9]
    expected = sum(counted_flops(tiny_mixtral, 1, length, backward=True) for length in lengths)
    assert FlopsCounter(hf).sequences_flops(lengths) == expected


def test_step_metrics_divide_the_step_flops_by_time_gpus_and_peak(tiny_mixtral):
    hf = HFModelConfig.from_file(tiny_mixtral)
    flops = training_flops(hf, 1, 16) + training_flops(hf, 1, 24)
    metrics = FlopsCounter(hf, peak_tflops=2.0, world_size=8).step_metrics(
        real_tokens=300, computed_positions=400, model_flops=flops, seconds=0.5)
    assert metrics["tokens_per_second"] == pytest.approx(600.0, rel=1e-12)
    assert metrics["tflops_per_gpu"] == pytest.approx(flops / 0.5 / 8 / 1e12, rel=1e-12)
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_gpu"] / 2.0, rel=1e-12)
    assert metrics["real_token_fraction"] == 0.75
    if not torch.cuda.is_available():
        assert "mfu" not in FlopsCounter(hf, world_size=8).step_metrics(300, 400, flops, 0.5)


def test_peak_table_matches_torch_device_names():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", fp8=True) == 1979.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no FP8 on Ampere
    assert peak_tflops_for(None) is None and peak_tflops_for("Tesla T4") is None
