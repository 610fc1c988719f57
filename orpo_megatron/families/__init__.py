"""Model families: what a Hugging Face config.json means in Megatron's terms, one file per family.

Importing the package imports every family, so that `family_of` finds it.
"""
from orpo_megatron.families.base import HFModelConfig, ModelConfigError, ModelFamily, family_of
from orpo_megatron.families.llama import Llama
from orpo_megatron.families.mixtral import Mixtral
from orpo_megatron.families.qwen2_moe import Qwen2Moe
from orpo_megatron.families.qwen3_moe import Qwen3Moe

__all__ = ["HFModelConfig", "ModelConfigError", "ModelFamily", "family_of", "Llama", "Mixtral", "Qwen2Moe", "Qwen3Moe"]
