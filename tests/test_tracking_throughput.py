"""Model FLOPs per token against torch's count of the matmuls of a real forward/backward; throughput figures."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.throughput import FlopsCounter, forward_flops_per_sequence, peak_tflops_for, training_flops


def counted_flops(model_dir: str, batch: int, seq_length: int, backward: bool) -> int:
    """FLOPs of every matmul torch dispatches in transformers' model (eager attention and experts)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", experts_implementation="eager")
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_length),
                              generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=input_ids, labels=input_ids if backward else None)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["tiny_mixtral", "tiny_mistral"])
def test_flops_equal_counted_matmul_flops_of_transformers_forward_and_backward(model, request):
    """Exact: both sides count only matmuls, and every routed token runs exactly top-k experts."""
    model_dir = request.getfixturevalue(model)
    hf = HFModelConfig.from_file(model_dir)
    batch, seq_length = 3, 37
    assert counted_flops(model_dir, batch, seq_length, backward=False) == batch * forward_flops_per_sequence(
        hf, seq_length)
    assert counted_flops(model_dir, batch, seq_length, backward=True) == training_flops(hf, batch, seq_length)


def test_step_metrics_divide_the_step_flops_by_time_gpus_and_peak(tiny_mixtral):
    hf = HFModelConfig.from_file(tiny_mixtral)
    micro_batches = [{"input_ids": torch.zeros(4, 16, dtype=torch.long)},
                     {"input_ids": torch.zeros(4, 24, dtype=torch.long)}]
    per_rank = training_flops(hf, 4, 16) + training_flops(hf, 4, 24)
    metrics = FlopsCounter(hf, peak_tflops=2.0, world_size=8).step_metrics(micro_batches, dp_size=2, seconds=0.5,
                                                                           tokens=300)
    assert metrics["tokens_per_second"] == pytest.approx(600.0, rel=1e-12)
    assert metrics["tflops_per_gpu"] == pytest.approx(per_rank * 2 / 0.5 / 8 / 1e12, rel=1e-12)
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_gpu"] / 2.0, rel=1e-12)
    if not torch.cuda.is_available():
        assert "mfu" not in FlopsCounter(hf, world_size=8).step_metrics(micro_batches, 2, 0.5, 300)


def test_peak_table_matches_torch_device_names():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", fp8=True) == 1979.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no FP8 on Ampere
    assert peak_tflops_for(None) is None and peak_tflops_for("Tesla T4") is None
