"""Tiny, self-made Hugging Face fixtures: Mixtral-, Mistral-, Qwen3-MoE- and Qwen2-MoE-layout checkpoints, a
sentencepiece tokenizer and a Qwen3-style byte-level BPE `tokenizer.json`.

They let the demo and the tests run on a CPU with no downloads. The checkpoint is random (seeded) and has the
exact file layout of a real one (config.json + safetensors); the tokenizers are trained on a corpus shipped in
`orpo_megatron/assets/`. The sentencepiece one carries a Zephyr chat template in `tokenizer_config.json`, like the
alignment-handbook's Zephyr-141B recipe; the byte-level one has Qwen3's pipeline and special tokens.
"""
from __future__ import annotations

import io
import json
import os

import torch
from safetensors.torch import save_file

from orpo_megatron.data.chat_template import CHATML
from orpo_megatron.data.chat_template import ZEPHYR as ZEPHYR_CHAT_TEMPLATE
from orpo_megatron.checkpoint.hf_mapping import hf_outer_shapes
from orpo_megatron.model_config import HFModelConfig

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TOKENIZER_CORPUS = os.path.join(ASSETS, "tokenizer_corpus.txt")
TINY_VOCAB_SIZE = 600

# Small but with every feature of Mixtral-8x22B: GQA (ratio 4), top-2 of 4 experts, untied embeddings, a
# vocabulary that needs padding.
TINY_MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": TINY_VOCAB_SIZE,
    "max_position_embeddings": 1024,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "router_jitter_noise": 0.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

TINY_MISTRAL_CONFIG = {
    **{k: v for k, v in TINY_MIXTRAL_CONFIG.items()
       if k not in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                    "output_router_logits", "router_jitter_noise")},
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
}


# Qwen-MoE shapes unlike Mixtral's: head_dim (24) apart from hidden / heads (16), GQA ratio 2, experts of their own
# FFN size, an odd vocabulary (601) larger than the tokenizer's (as Qwen's 151936 > 151669).
TINY_QWEN3_MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": TINY_VOCAB_SIZE + 1,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "attention_bias": False,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": 2,  # <|im_end|> of the tiny byte-level tokenizer
}

TINY_QWEN2_MOE_CONFIG = {
    **{k: v for k, v in TINY_QWEN3_MOE_CONFIG.items() if k != "attention_bias"},
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "shared_expert_intermediate_size": 48,
    "qkv_bias": True,
    "norm_topk_prob": False,
}

TINY_CONFIGS = {"mixtral": TINY_MIXTRAL_CONFIG, "mistral": TINY_MISTRAL_CONFIG, "qwen3_moe": TINY_QWEN3_MOE_CONFIG,
                "qwen2_moe": TINY_QWEN2_MOE_CONFIG}


def random_hf_tensors(hf: HFModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with every tensor name and shape of the classic HF layout; norms around 1."""
    generator = torch.Generator().manual_seed(seed)
    shapes = hf_outer_shapes(hf)
    for layer in range(hf.num_layers):
        shapes.update(hf.family.hf_layer_shapes(layer))
    tensors = {}
    for name, shape in shapes.items():
        if "norm" in name.split(".")[-2]:
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            # Larger than initializer_range so the tiny model has sharp, input-dependent routing and logits.
            tensor = 0.08 * torch.randn(shape, generator=generator)
        tensors[name] = tensor.to(dtype).contiguous()
    return tensors


def write_hf_checkpoint(out_dir: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def write_tiny_tokenizer(out_dir: str, vocab_size: int = TINY_VOCAB_SIZE, add_dummy_prefix: bool = True) -> None:
    """Train a byte-fallback BPE sentencepiece model (Mixtral's special ids: unk 0, BOS 1, EOS 2); without
    `add_dummy_prefix` the model, like Gemma's, puts no `▁` before the text."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=TOKENIZER_CORPUS, model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        # Identity normalization as in Mixtral's tokenizer, so every tokenizer reading these files agrees.
        normalization_rule_name="identity", add_dummy_prefix=add_dummy_prefix, num_threads=1, minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 1024,
        "chat_template": ZEPHYR_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)


# Qwen2/Qwen3's pre-tokenizer split (transformers' Qwen2Tokenizer and the models' tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_PLAIN_ADDED_TOKENS = ("<think>", "</think>")  # added but not special in Qwen3: decoded, never skipped


def write_tiny_byte_level_tokenizer(out_dir: str, vocab_size: int = TINY_VOCAB_SIZE,
                                    chat_template: str = CHATML) -> None:
    """Train a byte-level BPE `tokenizer.json` with Qwen3's pipeline (NFC, its regex split, byte-level bytes), special
    tokens and tokenizer_config.json (no BOS: `"bos_token": null`; EOS `<|im_end|>`), `vocab_size` ids in all."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_PLAIN_ADDED_TOKENS), show_progress=False,
                                  special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([TOKENIZER_CORPUS], trainer)
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in QWEN_PLAIN_ADDED_TOKENS])
    trained_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained_size != vocab_size:
        raise ValueError(f"the tokenizer corpus gives {trained_size} tokens, not {vocab_size}")
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tokenizer.token_to_id(token)): {"content": token, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False,
                                                 "special": token in QWEN_SPECIAL_TOKENS}
             for token in QWEN_SPECIAL_TOKENS + QWEN_PLAIN_ADDED_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "chat_template": chat_template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


def write_tiny_model(out_dir: str, seed: int = 1234, dense: bool = False, dtype: torch.dtype = torch.float32,
                     config_overrides: dict | None = None, with_tokenizer: bool = True) -> str:
    """A complete tiny HF model folder: config, random weights and (by default) the tiny tokenizer."""
    config = dict(TINY_MISTRAL_CONFIG if dense else TINY_MIXTRAL_CONFIG, **(config_overrides or {}))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf = HFModelConfig.from_dict(config)
    write_hf_checkpoint(out_dir, config, random_hf_tensors(hf, seed, dtype))
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    if with_tokenizer:
        write_tiny_tokenizer(out_dir)
    return out_dir


def write_tiny_qwen_moe(out_dir: str, family: str = "qwen3_moe", seed: int = 1234, dtype: torch.dtype = torch.float32,
                        config_overrides: dict | None = None, with_tokenizer: bool = True) -> str:
    """A tiny Qwen3-MoE or Qwen2-MoE folder written by transformers' own model class (`save_pretrained`, so the
    file layout is transformers'), with random (seeded) weights as `random_hf_tensors` draws them, and (by default)
    the tiny byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(TINY_CONFIGS[family], **(config_overrides or {}))
    HFModelConfig.from_dict(config)  # refused here as conversion would refuse it
    with torch.random.fork_rng():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    model.to(dtype).save_pretrained(out_dir)
    if with_tokenizer:
        write_tiny_byte_level_tokenizer(out_dir)
    return out_dir
