"""What a Hugging Face `config.json` says, read and validated, and the interface of a model family.

A model family (one file beside this one: `llama.py`, `mixtral.py`) says once what a config.json of its
architectures means in Megatron's terms: the fields it reads beyond the ones every family shares, the
`TransformerConfig` fields, Megatron-LM's arguments in common.pt and their check against a stored checkpoint, and
the HF <-> Megatron tensor mapping. `family_of` finds the family of an architecture among the subclasses of
`ModelFamily`, the most specific first. This module does not build modules (`model.py`), choose the parallel
layout or numerics (`model_config.py`), or read and write checkpoints (`checkpoint/`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any, ClassVar

import torch

from orpo_megatron.errors import UserError

# The prefix of the decoder layers' checkpoint keys: `GPTModel.sharded_state_dict()` stacks every layer's tensor
# under one key, on a leading axis.
LAYERS = "decoder.layers."


class ModelConfigError(UserError, ValueError):
    """A config.json this project cannot run, with the file and field named."""


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """The architectural fields of a `config.json`, validated by its family.

    `num_experts` is None for dense families.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    initializer_range: float
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float = 0.0
    # The experts' FFN size where it differs from the dense `intermediate_size` (Qwen-MoE); None: the same.
    moe_intermediate_size: int | None = None
    # Routing weights: softmax over all experts, top-k, then renormalized over the k (True, Mixtral's rule) or not.
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_intermediate_size(self) -> int:
        """The FFN size of one routed expert."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def family(self) -> ModelFamily:
        """This config's family, bound to it."""
        return family_of([self.architecture])(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> "HFModelConfig":
        architectures = config.get("architectures") or []
        family = family_of(architectures, source)

        def field(name: str, default: Any = KeyError) -> Any:
            if name in config and config[name] is not None:
                return config[name]
            if default is KeyError:
                raise ModelConfigError(f"{source}: required field '{name}' is missing")
            return default

        # transformers v5 moved rope_theta / rope_scaling into rope_parameters.
        rope = config.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if config.get("rope_scaling") or rope_type not in ("default", None):
            raise ModelConfigError(
                f"{source}: RoPE scaling ({config.get('rope_scaling') or rope}) is not supported; "
                "only plain RoPE (Mixtral, Mistral, Llama 2) is"
            )
        rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        if field("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act={config['hidden_act']!r}; expected 'silu'")

        hidden_size = int(field("hidden_size"))
        heads = int(field("num_attention_heads"))
        return cls(
            architecture=architectures[0],
            num_layers=int(field("num_hidden_layers")),
            hidden_size=hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=int(field("num_key_value_heads", heads)),
            head_dim=int(field("head_dim", hidden_size // heads)),
            intermediate_size=int(field("intermediate_size")),
            vocab_size=int(field("vocab_size")),
            max_position_embeddings=int(field("max_position_embeddings")),
            rope_theta=rope_theta,
            rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(field("tie_word_embeddings", False)),
            initializer_range=float(field("initializer_range", 0.02)),
            **{"attention_bias": bool(field("attention_bias", False)), **family.read_fields(field, source)},
            sliding_window=config.get("sliding_window"),
            raw=dict(config),
        )

    @classmethod
    def from_file(cls, path: str) -> "HFModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ModelConfigError(f"{path}: no such file; expected a Hugging Face config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(config, source=path)


class ModelFamily:
    """One family's meaning of a config.json in Megatron's terms, bound to one config (`HFModelConfig.family`).

    A family names the HF `architectures` it accepts and implements every method below; a family that differs
    from another in a few places subclasses it and overrides those.
    """

    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hf: HFModelConfig):
        self.hf = hf

    @classmethod
    def read_fields(cls, field: Callable[..., Any], source: str) -> dict[str, Any]:
        """The `HFModelConfig` fields of this family beyond the shared ones (or in place of a shared one, as
        `attention_bias`); `field(name[, default])` reads one (a missing field without a default is refused,
        named); `source` names the file in a refusal."""
        raise NotImplementedError

    def transformer_fields(self, moe_aux_loss_coeff: float | None) -> dict[str, Any]:
        """The architecture's `TransformerConfig` fields (the layout, numerics and kernels are the run's)."""
        raise NotImplementedError

    def megatron_args(self, *, padded_vocab_size: int, make_vocab_size_divisible_by: int,
                      iteration: int) -> dict[str, Any]:
        """The model as Megatron-LM's flags describe it, for the `args` of common.pt."""
        raise NotImplementedError

    def stored_model(self, args: argparse.Namespace) -> dict[str, object]:
        """What Megatron-LM's stored arguments say about the model, in config.json's terms, keyed as
        `config_model`."""
        raise NotImplementedError

    def config_model(self) -> dict[str, object]:
        """This config's model in the terms of `stored_model`."""
        raise NotImplementedError

    def required_args(self) -> list[tuple[str, object, object]]:
        """What the family implies about the rest of the architecture: (Megatron-LM argument, the value it needs,
        Megatron-LM's default)."""
        raise NotImplementedError

    # The tensor mapping, one decoder layer at a time: the Megatron side is one layer's slice of each stacked
    # checkpoint key (the layer axis removed), as the Transformer Engine spec names them.
    def hf_layer_shapes(self, layer: int, present: Container[str] = ()) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of one decoder layer and its shape, in the layout that the names `present` in a folder
        use where a family has two (default: the one export writes)."""
        raise NotImplementedError

    def megatron_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Stacked checkpoint key -> the shape of one layer's slice of it."""
        raise NotImplementedError

    def extra_state_keys(self) -> dict[str, tuple[int, ...]]:
        """Keys of the `_extra_state` objects a model saves -> their grid: (layers,), (layers, experts) or (1,)."""
        raise NotImplementedError

    def hf_layer_to_megatron(self, tensors: Mapping[str, torch.Tensor], layer: int,
                             keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """One decoder layer's HF tensors -> its slice of each stacked Megatron key (only `keys` if given).
        `tensors` may be lazy (`HFCheckpointReader.lazy()`): only the HF tensors the requested keys need are
        read."""
        raise NotImplementedError

    def megatron_layer_to_hf(self, tensors: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
        """Inverse of `hf_layer_to_megatron` (one layer's slices)."""
        raise NotImplementedError


def _families(family: type[ModelFamily] = ModelFamily) -> list[type[ModelFamily]]:
    """The subclasses of `family`, each after its own subclasses (the most specific first)."""
    found = []
    for subclass in family.__subclasses__():
        found += _families(subclass) + [subclass]
    return found


def family_of(architectures: list[str], source: str = "config.json") -> type[ModelFamily]:
    """The family of a config.json's `architectures` (its first entry), or a refusal naming those supported."""
    architecture = architectures[0] if architectures else None
    for family in _families():
        if architecture in family.architectures:
            return family
    supported = [name for family in _families() for name in family.architectures]
    raise ModelConfigError(f"{source}: architectures={architectures!r} is not supported; expected one of "
                           f"{', '.join(supported)}")
