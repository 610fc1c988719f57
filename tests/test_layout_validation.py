"""Wrong parallel layouts are refused up front, with the numbers that make them wrong."""
import pytest

from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.tiny_model import (TINY_MISTRAL_CONFIG, TINY_MIXTRAL_CONFIG, TINY_QWEN2_MOE_CONFIG,
                                      TINY_QWEN3_MOE_CONFIG)
from orpo_megatron.parallel import LayoutError, ParallelLayout

MIXTRAL = HFModelConfig.from_dict(TINY_MIXTRAL_CONFIG)  # 4 layers, 8 heads, 2 kv groups, 4 experts, ffn 96
MISTRAL = HFModelConfig.from_dict(TINY_MISTRAL_CONFIG)
# Experts of FFN 33 (split by TP/ETP) beside a dense FFN size no layer uses; a shared expert of FFN 47 (split by TP).
QWEN3_ODD_EXPERTS = HFModelConfig.from_dict(dict(TINY_QWEN3_MOE_CONFIG, moe_intermediate_size=33))
QWEN3_ODD_DENSE = HFModelConfig.from_dict(dict(TINY_QWEN3_MOE_CONFIG, intermediate_size=97))
QWEN2_ODD_SHARED = HFModelConfig.from_dict(dict(TINY_QWEN2_MOE_CONFIG, shared_expert_intermediate_size=47))


@pytest.mark.parametrize("layout, model, expected", [
    (dict(world_size=6, tensor_model_parallel_size=4), MIXTRAL, "world size 6 is not divisible by TP*PP = 4*1 = 4"),
    (dict(world_size=8, tensor_model_parallel_size=4), MIXTRAL, "2 key/value groups are not divisible by TP=4"),
    (dict(world_size=3, tensor_model_parallel_size=3), MIXTRAL, "8 attention heads are not divisible by TP=3"),
    (dict(world_size=3, expert_model_parallel_size=3), MIXTRAL, "4 experts are not divisible by EP=3"),
    (dict(world_size=3, pipeline_model_parallel_size=3), MIXTRAL, "4 layers are not divisible by PP=3"),
    (dict(world_size=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), MIXTRAL,
     "4 layers are not divisible by PP*VP = 2*4 = 8"),
    (dict(world_size=2, expert_model_parallel_size=2), MISTRAL, "EP=2 needs a mixture-of-experts model"),
    (dict(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=4), MIXTRAL,
     "world size 4 is not divisible by TP*EP*PP = 2*4*1 = 8"),
    (dict(world_size=1, sequence_parallel=True), MIXTRAL, "--sequence-parallel needs TP > 1"),
    (dict(world_size=1, virtual_pipeline_model_parallel_size=2), MIXTRAL, "VP=2 needs PP > 1"),
    (dict(world_size=2, tensor_model_parallel_size=2), QWEN3_ODD_EXPERTS,
     "expert FFN size 33 is not divisible by TP=2"),
    (dict(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1),
     QWEN2_ODD_SHARED, "shared expert FFN size 47 is not divisible by TP=2"),
    (dict(world_size=2, tensor_model_parallel_size=2, expert_tensor_parallel_size=1), MIXTRAL,
     "--expert-tensor-parallel-size=1 apart from TP=2 needs --expert-model-parallel-size > 1"),
    (dict(world_size=2, tensor_model_parallel_size=2, expert_tensor_parallel_size=1), MISTRAL,
     "--expert-tensor-parallel-size=1 needs a mixture-of-experts model"),
    (dict(world_size=6, tensor_model_parallel_size=2, expert_model_parallel_size=4, expert_tensor_parallel_size=1),
     MIXTRAL, "world size 6 is not divisible by ETP*EP*PP = 1*4*1 = 4"),
])
def test_wrong_layout_is_refused_naming_the_numbers(layout, model, expected):
    with pytest.raises(LayoutError) as err:
        ParallelLayout(**layout).validate(model)
    assert expected in str(err.value)


@pytest.mark.parametrize("layout", [
    dict(world_size=1),
    dict(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True),
    dict(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1,
         sequence_parallel=True),
    dict(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
         virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True),
])
def test_valid_layouts_pass(layout):
    ParallelLayout(**layout).validate(MIXTRAL)
    assert ParallelLayout(**layout).data_parallel_size >= 1


def test_expert_ffn_sizes_are_checked_apart_from_the_dense_one():
    """A MoE model's experts split by ETP (here 1) whatever their dense FFN size; the dense size no layer uses is
    not checked."""
    ParallelLayout(world_size=2, tensor_model_parallel_size=2).validate(QWEN3_ODD_DENSE)
    ParallelLayout(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=2,
                   expert_tensor_parallel_size=1).validate(QWEN3_ODD_EXPERTS)
