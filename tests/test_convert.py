"""tools/convert_hf.py and the checkpoint format, checked against the HF tensors and transformers.

Covers: HF -> Megatron -> HF round trips (bit-identical), the stored tensors and files against an independent
mapping and Megatron-LM's layout, transformers-v5 fused input, refusal of bad input, the upgrade of this
project's first format, and converted / saved weights loaded at other layouts (TP2 x EP2, PP2, PP2 x VP2)
giving transformers' log-probabilities, with `_extra_state` carried across layouts.
All conversions of this module run in one process (tests/workers/convert_cli.py) to pay the imports once.
"""
import filecmp
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from orpo_megatron import tiny_model
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import writer as checkpoint_writer
from orpo_megatron.checkpoint import conversion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_hf.py")
CLI_WORKER = os.path.join(REPO, "tests", "workers", "convert_cli.py")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# "tied": Mixtral with tie_word_embeddings (no lm_head; at PP > 1 the last stage holds a copy of the embedding).
ROUND_TRIPS = [("mixtral", "fp32"), ("mixtral", "bf16"), ("mistral", "fp32"), ("mistral", "bf16"), ("tied", "fp32"),
               ("qwen3_moe", "fp32"), ("qwen3_moe", "bf16"), ("qwen2_moe", "fp32"), ("qwen2_moe", "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------- helpers
def hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def stored_tensors(root: str, scratch: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint root's tracked folder, read by PyTorch's own DCP converter (independent of
    our reader); the `_extra_state` objects left out."""
    target = os.path.join(scratch, "stored.pt")
    dcp_to_torch_save(checkpoint_format.checkpoint_folder(root), target)
    stored = torch.load(target, weights_only=False)
    os.remove(target)
    return {key: value for key, value in stored.items() if torch.is_tensor(value)}


def stored_objects(root: str, scratch: str) -> dict[str, object]:
    """The `_extra_state` objects, by their sharded key (megatron-core stores each object as a one-item list)."""
    target = os.path.join(scratch, "stored.pt")
    dcp_to_torch_save(checkpoint_format.checkpoint_folder(root), target)
    stored = torch.load(target, weights_only=False)
    os.remove(target)
    return {key: value[0] for key, value in stored.items() if "/shard_" in key}


def run_cli(commands: dict[str, list[str]], scratch: str) -> dict[str, dict]:
    """Run the named tool command lines in one process; returns each one's rc / stdout / stderr."""
    os.makedirs(scratch, exist_ok=True)
    commands_file, results_file = os.path.join(scratch, "commands.json"), os.path.join(scratch, "results.json")
    with open(commands_file, "w") as f:
        json.dump(list(commands.values()), f)
    proc = subprocess.run([sys.executable, CLI_WORKER, commands_file, results_file], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise AssertionError(f"convert_cli.py exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    with open(results_file) as f:
        return dict(zip(commands, json.load(f)))


def succeeded(result: dict) -> dict:
    assert result["rc"] == 0, f"{' '.join(result['argv'])} failed:\n{result['stderr'][-3000:]}"
    return result


def independent_megatron_tensors(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The stored Megatron tensors, written out here from the HF tensors with plain indexing: TE-spec keys,
    layers stacked on axis 0, experts on axis 1, SwiGLU fc1 as [gate rows; up rows]."""
    groups, d = config["num_key_value_heads"], config["head_dim"]
    per_group = config["num_attention_heads"] // groups
    layers = []
    for layer in range(config["num_hidden_layers"]):
        p, m = f"model.layers.{layer}.", "decoder.layers."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(groups):  # [q heads of group g, k_g, v_g] per query group
            rows += [q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        out = {
            m + "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
            m + "self_attention.linear_qkv.weight": torch.cat(rows),
            m + "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
        }
        if "num_local_experts" in config:
            experts = [p + f"block_sparse_moe.experts.{e}." for e in range(config["num_local_experts"])]
            out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[m + "mlp.router.weight"] = hf[p + "block_sparse_moe.gate.weight"]
            out[m + "mlp.experts.experts.linear_fc1.weight"] = torch.stack(
                [torch.cat([hf[x + "w1.weight"], hf[x + "w3.weight"]]) for x in experts])
            out[m + "mlp.experts.experts.linear_fc2.weight"] = torch.stack([hf[x + "w2.weight"] for x in experts])
        else:
            out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
        layers.append(out)
    return {key: torch.stack([layer[key] for layer in layers]) for key in layers[0]}


def assert_same_stored(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    """Equal tensors; vocabulary tensors compared on their common rows, the longer one's extra rows zero."""
    assert sorted(a) == sorted(b), where
    for name in b:
        x, y = a[name], b[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight") and x.shape != y.shape:
            rows = min(x.shape[0], y.shape[0])
            longer = x if x.shape[0] > rows else y
            assert torch.equal(x[:rows], y[:rows]) and not longer[rows:].any(), (where, name)
        else:
            assert torch.equal(x, y), (where, name)


def write_first_format(hf_dir: str, out: str) -> str:
    """A converted checkpoint as this project's first format stored it: per-layer torch_dist folders under
    per-layer local-spec names (fc1 as [2, ffn, hidden]), the vocabulary unpadded, our own metadata.json."""
    conversion.init_single_process()
    tensors, config = hf_tensors(hf_dir), json.load(open(os.path.join(hf_dir, "config.json")))
    stacked = independent_megatron_tensors(tensors, config)
    for layer in range(config["num_hidden_layers"]):
        m, old = "decoder.layers.", f"decoder.layers.{layer}."
        names = {old + "input_layernorm.weight": stacked[m + "self_attention.linear_qkv.layer_norm_weight"][layer],
                 old + "pre_mlp_layernorm.weight": stacked[m + "pre_mlp_layernorm.weight"][layer],
                 old + "self_attention.linear_qkv.weight": stacked[m + "self_attention.linear_qkv.weight"][layer],
                 old + "self_attention.linear_proj.weight": stacked[m + "self_attention.linear_proj.weight"][layer],
                 old + "mlp.router.weight": stacked[m + "mlp.router.weight"][layer]}
        for e in range(config["num_local_experts"]):
            fc1 = stacked[m + "mlp.experts.experts.linear_fc1.weight"][layer, e]
            names[old + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1.reshape(2, -1, fc1.shape[-1])
            names[old + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = \
                stacked[m + "mlp.experts.experts.linear_fc2.weight"][layer, e]
        checkpoint_writer.save(os.path.join(out, "model", f"layer_{layer:04d}"), {
            name: ShardedTensor.from_rank_offsets(name, t.contiguous(), replica_id=0) for name, t in names.items()}, {})
    outer = {"embedding.word_embeddings.weight": tensors["model.embed_tokens.weight"],
             "decoder.final_layernorm.weight": tensors["model.norm.weight"], "output_layer.weight": tensors["lm_head.weight"]}
    checkpoint_writer.save(os.path.join(out, "model", "outer"), {
        name: ShardedTensor.from_rank_offsets(name, t, replica_id=0) for name, t in outer.items()}, {})
    os.makedirs(os.path.join(out, "hf_files"))
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out, "hf_files", name))
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump({"format": "orpo-megatron-model-weights", "format_version": 1, "dtype": "float32",
                   "produced_by": "tools/convert_hf.py hf-to-megatron", "vocab_size": config["vocab_size"],
                   "padded_vocab_size": None, "iteration": None, "created": "", "hf_config": config}, f)
    return out


def rewrite_tensors(src: str, dst: str, edit) -> str:
    """Copy an HF folder with its tensors changed by `edit(tensors)`."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sources(tiny_mixtral, tiny_mistral, tiny_qwen3_moe, tiny_qwen2_moe, tmp_path_factory) -> dict:
    """HF folders: the round-trip inputs, transformers-v5 fused copies, and the bad inputs."""
    root = str(tmp_path_factory.mktemp("convert_sources"))
    out = {("mixtral", "fp32"): tiny_mixtral, ("mistral", "fp32"): tiny_mistral,
           ("qwen3_moe", "fp32"): tiny_qwen3_moe, ("qwen2_moe", "fp32"): tiny_qwen2_moe}
    for family, seed in (("qwen3_moe", 2024), ("qwen2_moe", 2025)):  # the fp32 fixtures' weights, rounded once
        out[(family, "bf16")] = tiny_model.write_tiny_qwen_moe(os.path.join(root, f"{family}_bf16"), family, seed=seed,
                                                             dtype=torch.bfloat16)
    out[("mixtral", "bf16")] = tiny_model.write_tiny_model(os.path.join(root, "mixtral_bf16"), seed=1234,
                                                         dtype=torch.bfloat16)
    out[("mistral", "bf16")] = tiny_model.write_tiny_model(os.path.join(root, "mistral_bf16"), seed=4321, dense=True,
                                                         dtype=torch.bfloat16)
    out[("tied", "fp32")] = tiny_model.write_tiny_model(os.path.join(root, "tied"), seed=99,
                                                      config_overrides={"tie_word_embeddings": True})

    from transformers import AutoModelForCausalLM

    for name, classic in (("fused", tiny_mixtral), ("qwen3_moe_fused", tiny_qwen3_moe)):
        AutoModelForCausalLM.from_pretrained(classic, torch_dtype=torch.float32).save_pretrained(
            os.path.join(root, name), save_original_format=False)
        out[name] = os.path.join(root, name)

    small = tiny_model.write_tiny_model(os.path.join(root, "small"), seed=7, with_tokenizer=False)
    out["missing"] = rewrite_tensors(small, os.path.join(root, "missing"),
                                     lambda t: t.pop("model.layers.2.block_sparse_moe.experts.1.w3.weight"))
    out["extra"] = rewrite_tensors(small, os.path.join(root, "extra"), lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    out["shape"] = rewrite_tensors(small, os.path.join(root, "shape"), lambda t: t.update(
        {"model.layers.3.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    arch = shutil.copytree(small, os.path.join(root, "arch"))
    with open(os.path.join(arch, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(arch, "config.json"), "w") as f:
        json.dump(dict(config, architectures=["DeepseekV3ForCausalLM"]), f)
    out["arch"] = arch
    dense_layers = shutil.copytree(tiny_qwen3_moe, os.path.join(root, "dense_layers"))
    with open(os.path.join(tiny_qwen3_moe, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dense_layers, "config.json"), "w") as f:
        json.dump(dict(config, mlp_only_layers=[0]), f)
    out["dense_layers"] = dense_layers
    out["small"] = small
    out["first_format"] = write_first_format(tiny_mixtral, os.path.join(root, "first_format"))
    return out


@pytest.fixture(scope="module")
def cli(sources, tmp_path_factory) -> dict:
    """Every conversion of this module, run once: {"root": output folder, name: result}."""
    root = str(tmp_path_factory.mktemp("convert_outputs"))
    commands = {}
    for model, dtype in ROUND_TRIPS:
        ckpt, back = os.path.join(root, f"ckpt_{model}_{dtype}"), os.path.join(root, f"hf_{model}_{dtype}")
        commands[f"to_megatron_{model}_{dtype}"] = ["hf-to-megatron", "--hf-dir", sources[(model, dtype)],
                                                    "--output", ckpt, "--dtype", dtype]
        commands[f"to_hf_{model}_{dtype}"] = ["megatron-to-hf", "--load", ckpt, "--output", back,
                                              "--max-shard-size", "100KB"]
    commands["to_megatron_mixtral_fp32"].append("--verify")
    # The exported folder is sharded with an index: read it back in as an input.
    commands["from_sharded"] = ["hf-to-megatron", "--hf-dir", os.path.join(root, "hf_mixtral_fp32"),
                                "--output", os.path.join(root, "ckpt_from_sharded"), "--dtype", "fp32"]
    commands["to_megatron_fp32_as_bf16"] = ["hf-to-megatron", "--hf-dir", sources[("mixtral", "fp32")],
                                            "--output", os.path.join(root, "ckpt_as_bf16"), "--dtype", "bf16"]
    commands["to_hf_fp32_as_bf16"] = ["megatron-to-hf", "--load", os.path.join(root, "ckpt_as_bf16"),
                                      "--output", os.path.join(root, "hf_as_bf16")]
    for fused in ("fused", "qwen3_moe_fused"):
        commands[fused] = ["hf-to-megatron", "--hf-dir", sources[fused],
                           "--output", os.path.join(root, f"ckpt_{fused}"), "--dtype", "fp32"]
    for case in ("missing", "extra", "shape", "arch", "dense_layers"):
        commands[case] = ["hf-to-megatron", "--hf-dir", sources[case], "--output", os.path.join(root, f"bad_{case}")]
    os.makedirs(os.path.join(root, "existing"))
    with open(os.path.join(root, "existing", "keep.txt"), "w") as f:
        f.write("user data")
    os.makedirs(os.path.join(root, "replaced", "release"))  # a previous output of the command
    with open(os.path.join(root, "replaced", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    commands["existing"] = ["hf-to-megatron", "--hf-dir", sources["small"], "--output", os.path.join(root, "existing")]
    commands["replaced"] = ["hf-to-megatron", "--hf-dir", sources["small"], "--output", os.path.join(root, "replaced"),
                            "--overwrite"]
    # A checkpoint folder whose writer stopped before megatron-core's metadata.json.
    os.makedirs(os.path.join(root, "incomplete"))
    for name in (".metadata", "common.pt"):
        open(os.path.join(root, "incomplete", name), "w").close()
    commands["export_incomplete"] = ["megatron-to-hf", "--load", os.path.join(root, "incomplete"),
                                     "--output", os.path.join(root, "bad_export_incomplete")]
    commands["export_hf_folder"] = ["megatron-to-hf", "--load", sources["small"],
                                    "--output", os.path.join(root, "bad_export_hf_folder")]
    commands["export_first_format"] = ["megatron-to-hf", "--load", sources["first_format"],
                                       "--output", os.path.join(root, "bad_export_first_format")]
    commands["upgrade"] = ["upgrade", "--load", sources["first_format"], "--output", os.path.join(root, "upgraded")]
    commands["to_hf_upgraded"] = ["megatron-to-hf", "--load", os.path.join(root, "upgraded"),
                                  "--output", os.path.join(root, "hf_upgraded")]
    return {"root": root, **run_cli(commands, os.path.join(root, "cli"))}


# ------------------------------------------------------------------------------------------------ round trip
def test_help_describes_both_directions():
    proc = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "hf-to-megatron" in proc.stdout and "megatron-to-hf" in proc.stdout
    for command, flags in (("hf-to-megatron", ("--hf-dir", "--dtype", "--overwrite", "--verify")),
                           ("megatron-to-hf", ("--load", "--max-shard-size", "--dtype", "--overwrite"))):
        proc = subprocess.run([sys.executable, TOOL, command, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and all(flag in proc.stdout for flag in flags), proc.stdout


@pytest.mark.parametrize("model,dtype", ROUND_TRIPS)
def test_round_trip_is_bit_identical(cli, sources, model, dtype):
    succeeded(cli[f"to_megatron_{model}_{dtype}"])
    succeeded(cli[f"to_hf_{model}_{dtype}"])
    source, back = sources[(model, dtype)], os.path.join(cli["root"], f"hf_{model}_{dtype}")
    original, exported = hf_tensors(source), hf_tensors(back)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == DTYPES[dtype], name
        assert torch.equal(exported[name], tensor), name

    # Shards no larger than --max-shard-size (100 kB) unless one tensor is larger, and an index naming them.
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(original)
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert shard_files == sorted(os.path.basename(p) for p in glob.glob(f"{back}/*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for shard in shard_files:
        names = [n for n, s in index["weight_map"].items() if s == shard]
        size = sum(original[n].numel() * original[n].element_size() for n in names)
        assert size <= 100_000 or len(names) == 1, shard

    with open(os.path.join(source, "config.json")) as f, open(os.path.join(back, "config.json")) as g:
        assert json.load(g) == json.load(f)
    tokenizer_files = [name for name in checkpoint_format.HF_FILE_NAMES
                       if name != "config.json" and os.path.isfile(os.path.join(source, name))]
    assert len(tokenizer_files) >= 3, tokenizer_files  # tokenizer, its config, generation config
    for name in tokenizer_files:
        assert filecmp.cmp(os.path.join(source, name), os.path.join(back, name), shallow=False), name


def test_fp32_weights_converted_to_bf16_are_rounded_once(cli, sources):
    succeeded(cli["to_megatron_fp32_as_bf16"])
    succeeded(cli["to_hf_fp32_as_bf16"])
    original, exported = hf_tensors(sources[("mixtral", "fp32")]), hf_tensors(os.path.join(cli["root"], "hf_as_bf16"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    with open(os.path.join(cli["root"], "hf_as_bf16", "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_verify_reports_logits_equal_to_transformers(cli):
    stdout = succeeded(cli["to_megatron_mixtral_fp32"])["stdout"]
    line = next(line for line in stdout.splitlines() if line.startswith("verify:"))
    assert float(line.rsplit("=", 1)[1]) <= 1e-4, line


# Max |logit difference| over the true vocabulary at TP1. fp32: the same math in another order. bf16: ours and
# transformers' bf16 round differently (fused QKV, fp32 router, expert dispatch); against the fp32 logits of the
# same bf16 weights ours may be off by at most twice what transformers' own bf16 run is off.
FP32_LOGITS_TOLERANCE = 1e-5
BF16_VS_FP32_FACTOR = 2.0


@pytest.mark.parametrize("model", ["qwen3_moe", "qwen2_moe"])
def test_converted_checkpoint_gives_transformers_logits_at_tp1(cli, sources, model):
    """Our model built from the fp32 and the bf16 conversion (computing in fp32 and in bf16) against transformers'
    model of the same family on the source folder."""
    from transformers import AutoModelForCausalLM

    from orpo_megatron.model_config import PrecisionConfig
    from orpo_megatron.parallel import ParallelLayout
    from orpo_megatron.rank_model import build_for_rank

    conversion.init_single_process()
    tokens = torch.randint(0, 601, (2, 24), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(24).expand(2, 24)

    def ours(dtype: str) -> torch.Tensor:
        succeeded(cli[f"to_megatron_{model}_{dtype}"])
        info = checkpoint_format.describe(os.path.join(cli["root"], f"ckpt_{model}_{dtype}"))
        chunk = build_for_rank(info.hf, ParallelLayout(), precision=PrecisionConfig(bf16=dtype == "bf16"),
                               weights=info).chunks[0].eval()
        with torch.no_grad():
            return chunk(tokens, positions, attention_mask=None)[..., :info.hf.vocab_size].float()

    def transformers_logits(source_dtype: str, dtype: str) -> torch.Tensor:
        reference = AutoModelForCausalLM.from_pretrained(sources[(model, source_dtype)], dtype=DTYPES[dtype],
                                                         attn_implementation="eager").eval()
        assert type(reference).__name__ == f"{model.title().replace('_', '')}ForCausalLM"
        with torch.no_grad():
            return reference(tokens).logits.float()

    fp32_difference = (ours("fp32") - transformers_logits("fp32", "fp32")).abs().max().item()
    truth = transformers_logits("bf16", "fp32")  # the bf16 weights, computed in fp32
    ours_bf16_error = (ours("bf16") - truth).abs().max().item()
    transformers_bf16_error = (transformers_logits("bf16", "bf16") - truth).abs().max().item()
    print(f"{model}: fp32 {fp32_difference:.2e}; bf16 vs fp32: ours {ours_bf16_error:.3e}, "
          f"transformers' {transformers_bf16_error:.3e}")
    assert fp32_difference <= FP32_LOGITS_TOLERANCE
    assert 0 < transformers_bf16_error and ours_bf16_error <= BF16_VS_FP32_FACTOR * transformers_bf16_error
    assert ours_bf16_error > 100 * FP32_LOGITS_TOLERANCE  # computed in bf16, not in fp32 on bf16 weights


def test_make_tiny_fixtures_writes_the_named_family(tmp_path, monkeypatch):
    import runpy

    from orpo_megatron.checkpoint.hf_mapping import HFCheckpointReader
    from orpo_megatron.model_config import HFModelConfig

    out = str(tmp_path / "tiny")
    monkeypatch.setattr(sys, "argv", ["make_tiny_fixtures.py", "--output", out, "--family", "qwen2_moe",
                                      "--dtype", "bf16"])
    runpy.run_path(os.path.join(REPO, "tools", "make_tiny_fixtures.py"), run_name="__main__")
    hf = HFModelConfig.from_file(out)
    assert hf.architecture == "Qwen2MoeForCausalLM" and hf.shared_expert_intermediate_size == 48
    reader = HFCheckpointReader(out)
    reader.check_complete(hf)
    reader.check_shapes(hf)
    assert {tensor.dtype for tensor in hf_tensors(out).values()} == {torch.bfloat16}
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


@pytest.mark.parametrize("model", ["qwen3_moe", "qwen2_moe"])
def test_stock_megatron_core_reads_converted_checkpoint(cli, sources, model, tmp_path):
    """The converted checkpoint loads into a GPTModel on megatron-core's stock local spec as Megatron-LM's
    `load_checkpoint` loads it (workers/megatron_interop.py, in this process at TP1: every key the model asks for
    found, q/k norms, shared expert and its gate included) and gives transformers' logits."""
    from transformers import AutoModelForCausalLM

    from orpo_megatron.model_config import HFModelConfig
    from workers import megatron_interop

    succeeded(cli[f"to_megatron_{model}_fp32"])
    conversion.init_single_process()
    hf = HFModelConfig.from_file(sources[(model, "fp32")])
    layout = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1, sequence_parallel=False)
    tokens = torch.randint(0, 601, (2, 16), generator=torch.Generator().manual_seed(6))
    megatron_interop.read(hf, layout, os.path.join(cli["root"], f"ckpt_{model}_fp32"), tokens, str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(sources[(model, "fp32")], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    stock = torch.load(os.path.join(tmp_path, "logits.pt"))
    assert stock.shape == expected.shape == (2, 16, 601)
    assert (stock - expected).abs().max().item() <= FP32_LOGITS_TOLERANCE


# ------------------------------------------------------------------------------------------ stored layout
@pytest.mark.parametrize("model", ["mixtral", "mistral"])
def test_stored_tensors_are_megatron_lm_checkpoint_tensors(cli, sources, model, tmp_path):
    """A release checkpoint root; the folder holds exactly the keys the model saves (TE names, layers stacked,
    experts stacked), with the HF values, the vocabulary padded with zero rows as Megatron-LM pads it at TP1."""
    succeeded(cli[f"to_megatron_{model}_fp32"])
    source, ckpt = sources[(model, "fp32")], os.path.join(cli["root"], f"ckpt_{model}_fp32")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    hf = hf_tensors(source)
    assert sorted(os.listdir(ckpt)) == ["latest_checkpointed_iteration.txt", "release"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "release"
    folder = os.path.join(ckpt, "release")
    assert {"metadata.json", "common.pt", ".metadata", "hf_files"} <= set(os.listdir(folder))
    with open(os.path.join(folder, "metadata.json")) as f:  # megatron-core's own
        assert json.load(f) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                "common_backend": "torch", "common_backend_version": 1}

    stored = stored_tensors(ckpt, str(tmp_path))
    expected = independent_megatron_tensors(hf, config)
    outer = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    assert sorted(stored) == sorted(set(expected) | outer)
    for name, tensor in expected.items():
        assert torch.equal(stored[name], tensor), name
    for name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                          ("output_layer.weight", "lm_head.weight")):
        assert stored[name].shape == (640, 64)  # 600 tokens padded to a multiple of 128
        assert torch.equal(stored[name][:600], hf[hf_name]) and not stored[name][600:].any()
    assert torch.equal(stored["decoder.final_layernorm.weight"], hf["model.norm.weight"])

    common = torch.load(os.path.join(folder, "common.pt"), weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups) == (4, 64, 8, 2)
    assert (args.padded_vocab_size, args.add_position_embedding, args.position_embedding_type) == (640, False, "rope")
    assert args.num_experts == config.get("num_local_experts") and args.rotary_base == 1000000
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    for name in ("config.json", *TOKENIZER_FILES):
        assert filecmp.cmp(os.path.join(source, name), os.path.join(folder, "hf_files", name), shallow=False), name


def test_converted_checkpoint_holds_every_key_the_model_saves(cli, tmp_path):
    """The same tensor keys and `_extra_state` objects as `GPTModel.sharded_state_dict()` (empty objects, as a
    model without FP8 state saves them), so Megatron-LM's default strictness finds all it asks for."""
    from megatron.core.dist_checkpointing import ShardedObject

    from orpo_megatron.model_config import HFModelConfig
    from orpo_megatron.parallel import ParallelLayout
    from orpo_megatron.rank_model import build_for_rank

    succeeded(cli["to_megatron_mixtral_fp32"])
    ckpt = os.path.join(cli["root"], "ckpt_mixtral_fp32")
    conversion.init_single_process()
    hf = HFModelConfig.from_file(os.path.join(ckpt, "release", "hf_files"))
    chunk = build_for_rank(hf, ParallelLayout()).chunks[0]
    wanted = {entry.unique_key if isinstance(entry, ShardedObject) else entry.key
              for entry in chunk.sharded_state_dict().values()}
    objects = stored_objects(ckpt, str(tmp_path))
    assert set(stored_tensors(ckpt, str(tmp_path))) | set(objects) == wanted
    assert "decoder.layers.pre_mlp_layernorm._extra_state/shard_3_4" in objects  # the TE spec's standalone norm
    assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_2.1_4.4" in objects
    assert all(value is None for value in objects.values())


@pytest.mark.parametrize("fused,model", [("fused", "mixtral"), ("qwen3_moe_fused", "qwen3_moe")])
def test_fused_expert_layout_converts_to_the_same_checkpoint(cli, fused, model, tmp_path):
    succeeded(cli[fused])
    succeeded(cli[f"to_megatron_{model}_fp32"])
    fused, classic = os.path.join(cli["root"], f"ckpt_{fused}"), os.path.join(cli["root"], f"ckpt_{model}_fp32")
    assert_same_stored(stored_tensors(fused, str(tmp_path)), stored_tensors(classic, str(tmp_path)), "fused")


def test_sharded_hf_folder_converts_like_a_single_file(cli, tmp_path):
    succeeded(cli["from_sharded"])
    sharded, single = os.path.join(cli["root"], "ckpt_from_sharded"), os.path.join(cli["root"], "ckpt_mixtral_fp32")
    assert_same_stored(stored_tensors(sharded, str(tmp_path)), stored_tensors(single, str(tmp_path)), "sharded")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,expected", [
    ("missing", ["missing tensors", "model.layers.2.block_sparse_moe.experts.1.w3.weight"]),
    ("extra", ["unexpected tensors", "model.layers.0.self_attn.rotary_emb.inv_freq"]),
    ("shape", ["model.layers.3.self_attn.k_proj.weight", "expected shape (16, 64), got (8, 64)"]),
    ("arch", ["DeepseekV3ForCausalLM", "not supported", "MixtralForCausalLM", "Qwen3MoeForCausalLM",
              "Qwen2MoeForCausalLM"]),
    ("dense_layers", ["config.json: mlp_only_layers=[0]", "dense layers among MoE layers are not supported"]),
])
def test_bad_hf_input_is_refused_with_its_name(cli, case, expected):
    result = cli[case]
    assert result["rc"] != 0
    assert all(text in result["stderr"] for text in expected), result["stderr"]
    # Nothing at the output path, and no staging folder left behind.
    assert not os.path.exists(os.path.join(cli["root"], f"bad_{case}"))
    assert not [n for n in os.listdir(cli["root"]) if n.startswith(f".bad_{case}")]


def test_existing_output_is_refused_without_overwrite(cli):
    result = cli["existing"]
    existing = os.path.join(cli["root"], "existing")
    assert result["rc"] != 0 and existing in result["stderr"] and "--overwrite" in result["stderr"]
    assert os.listdir(existing) == ["keep.txt"]
    replaced = os.path.join(cli["root"], "replaced")
    succeeded(cli["replaced"])
    assert sorted(os.listdir(replaced)) == ["latest_checkpointed_iteration.txt", "release"]
    assert os.path.isfile(os.path.join(replaced, "release", "common.pt"))  # the previous output was replaced
    assert not [n for n in os.listdir(cli["root"]) if n.startswith((".existing", ".replaced"))]


@pytest.mark.parametrize("case,expected", [
    ("export_incomplete", ["incomplete", "metadata.json"]),
    ("export_hf_folder", ["not a checkpoint", "latest_checkpointed_iteration.txt"]),
    ("export_first_format", ["first checkpoint format", "python tools/convert_hf.py upgrade --load"]),
])
def test_export_refuses_what_is_not_a_complete_checkpoint(cli, case, expected):
    result = cli[case]
    assert result["rc"] != 0 and all(text in result["stderr"] for text in expected), result["stderr"]
    assert not os.path.exists(os.path.join(cli["root"], f"bad_{case}"))


def test_first_format_upgrades_to_a_checkpoint_that_exports_bit_identical(cli, sources, tmp_path):
    succeeded(cli["upgrade"])
    succeeded(cli["to_hf_upgraded"])
    upgraded, converted = os.path.join(cli["root"], "upgraded"), os.path.join(cli["root"], "ckpt_mixtral_fp32")
    assert_same_stored(stored_tensors(upgraded, str(tmp_path)), stored_tensors(converted, str(tmp_path)), "upgraded")
    original, exported = hf_tensors(sources[("mixtral", "fp32")]), hf_tensors(os.path.join(cli["root"], "hf_upgraded"))
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[n], original[n]) for n in original)
    for name in ("config.json", *TOKENIZER_FILES):
        assert os.path.isfile(os.path.join(cli["root"], "hf_upgraded", name)), name


# ------------------------------------------------------------------------------- loading at other layouts
@pytest.fixture(scope="module")
def parallel_runs(cli, sources, torchrun, tmp_path_factory) -> dict:
    """The converted fp32 Mixtral loaded, run and saved at TP2 x EP2 (world 4, DP2), then at PP2 (world 2),
    which also loads the TP2 x EP2 save; the tied Mixtral at PP2 x VP2; every save exported again by the tool.
    The converted Qwen3-MoE and Qwen2-MoE loaded and run at TP2 x EP2."""
    for model in ("mixtral", "tied", "qwen3_moe", "qwen2_moe"):
        succeeded(cli[f"to_megatron_{model}_fp32"])
    root = str(tmp_path_factory.mktemp("convert_parallel"))
    ckpt, hf_dir = os.path.join(cli["root"], "ckpt_mixtral_fp32"), sources[("mixtral", "fp32")]
    tokens = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(11))
    torch.save(tokens, os.path.join(root, "tokens.pt"))
    tied_ckpt, tied_hf = os.path.join(cli["root"], "ckpt_tied_fp32"), sources[("tied", "fp32")]
    runs = {  # name: (world size, converted checkpoint, HF folder, layout)
        "tp2_ep2": (4, ckpt, hf_dir, ["--tp", "2", "--ep", "2"]),
        **{f"{model}_tp2_ep2": (4, os.path.join(cli["root"], f"ckpt_{model}_fp32"), sources[(model, "fp32")],
                                ["--tp", "2", "--ep", "2"]) for model in ("qwen3_moe", "qwen2_moe")},
        "pp2": (2, ckpt, hf_dir, ["--pp", "2", "--other-ckpt", os.path.join(root, "saved_tp2_ep2")]),
        "tied_pp2_vp2": (2, tied_ckpt, tied_hf, ["--pp", "2", "--vp", "2"]),
    }
    # The runs of one world size in one launch (a launch costs seconds of imports per process), in this order.
    for world in dict.fromkeys(world for world, *_ in runs.values()):
        flags = {name: ["--ckpt", run_ckpt, "--hf-dir", run_hf, "--save", os.path.join(root, f"saved_{name}"), *layout]
                 for name, (run_world, run_ckpt, run_hf, layout) in runs.items() if run_world == world}
        torchrun("convert_parallel.py", world, "--tokens", os.path.join(root, "tokens.pt"), "--out", root,
                 "--layouts", json.dumps(flags))

    # Each save is a checkpoint root naming iteration 7; export also takes the iteration folder itself.
    exports = {f"export_{name}": ["megatron-to-hf", "--load", os.path.join(root, name),
                                  "--output", os.path.join(root, f"hf_{name}")]
               for name in ("saved_tp2_ep2", "saved_pp2", "saved_tied_pp2_vp2")}
    exports["export_iteration_folder"] = ["megatron-to-hf", "--load", os.path.join(root, "saved_pp2", "iter_0000007"),
                                          "--output", os.path.join(root, "hf_iteration_folder")]
    return {"root": root, "tokens": tokens, **run_cli(exports, os.path.join(root, "cli"))}


def reports(run_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(run_dir, "rank*.json")))
    assert paths
    return [json.load(open(p)) for p in paths]


def transformers_logps(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = reference.eval()(tokens).logits.float()
    return torch.log_softmax(logits, dim=-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("layout,padded_vocab,model", [("tp2_ep2", 768, "mixtral"), ("pp2", 640, "mixtral"),
                                                       ("tied_pp2_vp2", 640, "tied"),
                                                       ("qwen3_moe_tp2_ep2", 768, "qwen3_moe"),
                                                       ("qwen2_moe_tp2_ep2", 768, "qwen2_moe")])
def test_logps_from_converted_checkpoint_match_transformers(parallel_runs, sources, layout, padded_vocab, model):
    run_dir = os.path.join(parallel_runs["root"], layout)
    for report in reports(run_dir):
        assert report["padded_vocab"] == padded_vocab  # 600 (Qwen: 601) rows padded differently at TP2 and TP1
        assert report["params_checked"] > 0 and report["params_mismatched"] == [], report
    ours = torch.load(os.path.join(run_dir, "logps.pt"))
    reference = transformers_logps(sources[(model, "fp32")], parallel_runs["tokens"])
    assert ours.shape == reference.shape == (2, 15)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_weights_saved_at_tp2_ep2_load_at_pp2_with_their_extra_state(parallel_runs):
    """The TP2 x EP2 save loads at PP2 into the same weights, and the `_extra_state` each standalone norm held
    when saved (a payload naming its layer) is back in the norm of that layer: saved and loaded, not dropped."""
    for report in reports(os.path.join(parallel_runs["root"], "pp2")):
        assert report["other_params_checked"] > 0 and report["other_params_mismatched"] == [], report
        assert report["other_extra_states_checked"] > 0 and report["other_extra_states_mismatched"] == [], report


@pytest.mark.parametrize("saved", ["saved_tp2_ep2", "saved_pp2", "saved_tied_pp2_vp2", "iteration_folder"])
def test_saves_at_any_layout_export_bit_identical(parallel_runs, cli, sources, saved, tmp_path):
    succeeded(parallel_runs[f"export_{saved}"])
    model = "tied" if "tied" in saved else "mixtral"
    original = hf_tensors(sources[(model, "fp32")])
    exported = hf_tensors(os.path.join(parallel_runs["root"], f"hf_{saved}"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    for name in TOKENIZER_FILES:
        assert os.path.isfile(os.path.join(parallel_runs["root"], f"hf_{saved}", name)), name

    if saved != "iteration_folder":
        # Layout-free on disk: the converter's tensors whatever layout saved them (the vocabulary padded as the
        # saving layout pads it: 768 rows at TP2, zeros beyond the 600 tokens).
        folder = os.path.join(parallel_runs["root"], saved)
        common = checkpoint_format.read_common(checkpoint_format.checkpoint_folder(folder))
        assert common["iteration"] == 7
        assert common["args"].padded_vocab_size == (768 if saved == "saved_tp2_ep2" else 640)
        converted = os.path.join(cli["root"], f"ckpt_{model}_fp32")
        assert_same_stored(stored_tensors(folder, str(tmp_path)), stored_tensors(converted, str(tmp_path)), saved)
