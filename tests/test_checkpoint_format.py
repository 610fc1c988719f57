"""The checkpoint format in one process: folder description and refusals, Megatron-LM's arguments both ways, the
streamed writer (pinning the torch.distributed.checkpoint behaviour it relies on), optimizer state through a
save and load (pinning the megatron-core optimizer internals it relies on), and the converter's input checks.

Saving and loading at parallel layouts is exercised end to end in test_convert.py, test_resume.py and
test_megatron_interop.py (torchrun workers).
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from orpo_megatron.checkpoint import format as fmt

from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron import tiny_model
from orpo_megatron.checkpoint import training as checkpointing
from orpo_megatron.checkpoint import conversion
from orpo_megatron.checkpoint.hf_mapping import HFCheckpointReader, MappingError, megatron_outer_shapes
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.optimizer import OptimizerMode
from orpo_megatron.planning import capacity, estimator
from workers.megatron_interop import megatron_lm_args

TINY = HFModelConfig.from_dict(tiny_model.TINY_MIXTRAL_CONFIG)
MLM_LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, expert_model_parallel_size=2)


# ------------------------------------------------------------------------------------------------- folders
def test_tracker_names_iterations_and_release(tmp_path):
    root = str(tmp_path)
    assert fmt.read_tracker(root) is None
    os.makedirs(fmt.iteration_dir(root, 12))
    fmt.write_tracker(root, 12)
    assert fmt.read_tracker(root) == 12 and fmt.iteration_dir(root, 12).endswith("iter_0000012")
    assert sorted(os.listdir(root)) == ["iter_0000012", fmt.TRACKER_FILE]  # no temporary file left
    fmt.write_tracker(root, fmt.RELEASE)
    with pytest.raises(fmt.CheckpointError, match="names release, but .*release is missing"):
        fmt.read_tracker(root)
    (tmp_path / fmt.TRACKER_FILE).write_text("latest")
    with pytest.raises(fmt.CheckpointError, match="expected an iteration number or 'release', found 'latest'"):
        fmt.read_tracker(root)


@pytest.mark.parametrize("case,expected", [
    ("missing_dir", ["no such checkpoint"]),
    ("empty_dir", ["is not a checkpoint", fmt.TRACKER_FILE]),
    ("unfinished", ["is incomplete", "metadata.json"]),
    ("first_format", ["first checkpoint format", "python tools/convert_hf.py upgrade --load"]),
    ("megatron_lm_without_config", ["has no hf_files/config.json", "--hf-config"]),
])
def test_describe_refuses_what_is_not_a_usable_checkpoint(tiny_converted, tmp_path, case, expected):
    folder = tmp_path / "ckpt"
    if case != "missing_dir":
        folder.mkdir()
    if case == "unfinished":  # a writer that stopped before megatron-core's metadata.json
        (folder / ".metadata").write_bytes(b"")
        (folder / "common.pt").write_bytes(b"")
    if case == "first_format":
        (folder / "metadata.json").write_text(json.dumps({"format": fmt.LEGACY_FORMAT, "format_version": 1}))
    if case == "megatron_lm_without_config":
        shutil.rmtree(folder)
        shutil.copytree(os.path.join(tiny_converted, fmt.RELEASE), folder)
        shutil.rmtree(folder / fmt.HF_FILES_DIR)
    with pytest.raises(fmt.CheckpointError) as err:
        fmt.describe(str(folder))
    assert all(text in str(err.value) for text in expected), str(err.value)


def test_a_converted_root_describes_its_release_folder(tiny_converted, tiny_mixtral):
    info = fmt.describe(tiny_converted)
    assert info.folder == os.path.join(tiny_converted, fmt.RELEASE) and info.release and info.iteration == 0
    assert info.hf == HFModelConfig.from_file(tiny_mixtral) and info.args.num_layers == 4
    assert info.hf_files == os.path.join(info.folder, fmt.HF_FILES_DIR)
    # The same model given explicitly is accepted; another one is refused, naming the fields.
    assert fmt.describe(tiny_converted, hf_config=tiny_mixtral).hf == info.hf
    with pytest.raises(fmt.CheckpointError, match="num_layers: checkpoint 4, .* 6"):
        other = HFModelConfig.from_dict(dict(tiny_model.TINY_MIXTRAL_CONFIG, num_hidden_layers=6))
        fmt.check_model_config(info.hf, other, info.folder, "given/config.json")



def test_stored_tensors_that_do_not_fit_the_config_are_named(tiny_converted):
    """Export reads by the config's shapes: a tensor stored with other rows is refused naming it, not misread."""
    info = fmt.describe(tiny_converted)
    conversion.init_single_process()
    wider = HFModelConfig.from_dict(dict(tiny_model.TINY_MIXTRAL_CONFIG, intermediate_size=128))
    with pytest.raises(fmt.CheckpointError, match=r"mlp\.experts\.experts\.linear_fc1\.weight has shape"):
        checkpoint_weights.read_layer(info.folder, wider, 0)
    larger_vocabulary = HFModelConfig.from_dict(dict(tiny_model.TINY_MIXTRAL_CONFIG, vocab_size=1000))
    with pytest.raises(fmt.CheckpointError, match=r"embedding\.word_embeddings\.weight has 640 rows; the "
                                                  r"vocabulary has 1000"):
        checkpoint_weights.read_outer(info.folder, larger_vocabulary)

# --------------------------------------------------------------------------------- Megatron-LM's arguments
def test_config_matching_megatron_lm_arguments_passes():
    """Arguments as Megatron-LM's parser yields them for its Mixtral example flags describe the tiny Mixtral."""
    fmt.check_args(megatron_lm_args(TINY, MLM_LAYOUT, 4), TINY, "CKPT", "config.json")


@pytest.mark.parametrize("changes,named", [
    ({"num_layers": 6}, "num_hidden_layers: config.json has 4, the checkpoint 6"),
    ({"num_query_groups": 8}, "num_key_value_heads: config.json has 2, the checkpoint 8"),
    ({"group_query_attention": False}, "num_key_value_heads: config.json has 2, the checkpoint 8"),
    ({"num_experts": 8}, "num_local_experts: config.json has 4, the checkpoint 8"),
    ({"moe_router_topk": 1}, "num_experts_per_tok: config.json has 2, the checkpoint 1"),
    ({"rotary_base": 10000}, "rope_theta: config.json has 1000000, the checkpoint 10000"),
    ({"untie_embeddings_and_output_weights": False}, "tie_word_embeddings: config.json has False"),
    ({"moe_router_pre_softmax": True}, "moe_router_pre_softmax=True in the checkpoint; MixtralForCausalLM needs False"),
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function='sigmoid'"),
    ({"ffn_hidden_size": 128, "moe_ffn_hidden_size": 128}, "intermediate_size: config.json has 96, the checkpoint 128"),
])
def test_config_differing_from_megatron_lm_arguments_is_named(changes, named):
    args = megatron_lm_args(TINY, MLM_LAYOUT, 4)
    vars(args).update(changes)
    with pytest.raises(fmt.CheckpointError) as err:
        fmt.check_args(args, TINY, "CKPT", "config.json")
    assert named in str(err.value) and "CKPT" in str(err.value), str(err.value)


QWEN3 = HFModelConfig.from_dict(tiny_model.TINY_QWEN3_MOE_CONFIG)
QWEN2 = HFModelConfig.from_dict(tiny_model.TINY_QWEN2_MOE_CONFIG)


@pytest.mark.parametrize("family,changes,named", [
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1] makes those layers dense MLPs"),
    ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers=[0] makes those layers dense MLPs"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2 makes only one layer in 2 MoE"),
    ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2 makes only one layer in 2 MoE"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=true is not supported for Qwen3-MoE"),
])
def test_qwen_configs_with_layers_we_cannot_build_are_refused(family, changes, named):
    from orpo_megatron.families import ModelConfigError

    with pytest.raises(ModelConfigError) as err:
        HFModelConfig.from_dict(dict(tiny_model.TINY_CONFIGS[family], **changes), source="qwen/config.json")
    assert str(err.value).startswith("qwen/config.json: ") and named in str(err.value), str(err.value)


@pytest.mark.parametrize("hf,changes,named", [
    (QWEN3, {}, None),
    (QWEN2, {}, None),
    (QWEN3, {"qk_layernorm": False}, "qk_layernorm=False in the checkpoint; Qwen3MoeForCausalLM needs True"),
    (QWEN3, {"moe_router_pre_softmax": True}, "norm_topk_prob: config.json has True, the checkpoint False"),
    (QWEN3, {"moe_ffn_hidden_size": 64}, "moe_intermediate_size: config.json has 32, the checkpoint 64"),
    (QWEN3, {"kv_channels": 16}, "head_dim: config.json has 24, the checkpoint 16"),
    (QWEN2, {"moe_router_pre_softmax": False}, "norm_topk_prob: config.json has False, the checkpoint True"),
    (QWEN2, {"moe_shared_expert_gate": False},
     "moe_shared_expert_gate=False in the checkpoint; Qwen2MoeForCausalLM needs True"),
    (QWEN2, {"moe_shared_expert_intermediate_size": None},
     "shared_expert_intermediate_size: config.json has 48, the checkpoint None"),
    (QWEN2, {"add_qkv_bias": False}, "attention_bias: config.json has True, the checkpoint False"),
])
def test_qwen_config_differing_from_stored_arguments_is_named(hf, changes, named):
    """The Qwen families' arguments in common.pt describe their config; each Qwen-specific one that differs is
    named."""
    args = fmt.megatron_args(hf, dict(MLM_LAYOUT, world_size=4, data_parallel_size=2), padded_vocab_size=768,
                             make_vocab_size_divisible_by=128, iteration=3)
    vars(args).update(changes)
    if named is None:
        fmt.check_args(args, hf, "CKPT", "config.json")
        return
    with pytest.raises(fmt.CheckpointError) as err:
        fmt.check_args(args, hf, "CKPT", "config.json")
    assert named in str(err.value), str(err.value)


def test_written_arguments_pass_megatron_lm_argument_checks():
    """What Megatron-LM's `check_checkpoint_args` compares (no default: the attribute must exist) and
    `load_checkpoint` reads, equal to a Megatron-LM Mixtral run of the same model; our own check passes too."""
    ours = fmt.megatron_args(TINY, dict(MLM_LAYOUT, world_size=4, data_parallel_size=2), padded_vocab_size=768,
                             make_vocab_size_divisible_by=128, iteration=3)
    theirs = megatron_lm_args(TINY, MLM_LAYOUT, 4)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                 "max_position_embeddings", "make_vocab_size_divisible_by", "tokenizer_type", "padded_vocab_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size", "data_parallel_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    # What `--use-checkpoint-args` copies into a run: the model as Megatron-LM's flags describe it.
    for name in ("ffn_hidden_size", "num_query_groups", "group_query_attention", "kv_channels", "position_embedding_type",
                 "rotary_base", "swiglu", "normalization", "untie_embeddings_and_output_weights", "add_bias_linear",
                 "add_qkv_bias", "num_experts", "moe_router_topk", "moe_router_pre_softmax", "moe_grouped_gemm"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert not getattr(ours, "no_save_optim", False) and not getattr(ours, "no_save_rng", False)
    fmt.check_args(ours, TINY, "CKPT", "config.json")


# ----------------------------------------------------------------------------------- streamed writer
def test_streamed_save_holds_one_chunk_at_a_time_and_reads_back(tmp_path, monkeypatch):
    """Pins what `write_streaming` relies on in torch.distributed.checkpoint: its file writer asks the planner for
    each chunk (`resolve_data`) only when it is about to write it, so no chunk is held while another is produced
    (on CPU; on a GPU machine torch's overlapping loader would read ahead about 1 MB). If a torch upgrade resolved
    chunks eagerly, conversion memory would grow with the model: this fails first. The chunks then read back, by
    layer slice, as produced."""
    from torch.distributed.checkpoint import filesystem

    conversion.init_single_process()
    shapes, outer = TINY.family.megatron_layer_shapes(), megatron_outer_shapes(TINY, 640)
    unwritten, held_when_producing = set(), []

    def make(key, layer):
        held_when_producing.append(len(unwritten))
        unwritten.add((key, layer))
        seed = hash((key, layer)) % 2**31
        return torch.randn(shapes[key] if layer is not None else outer[key], generator=torch.Generator().manual_seed(seed))

    write_item = filesystem._write_item

    def recording_write(transforms, stream, data, item, *args, **kwargs):
        unwritten.discard((item.index.fqn, item.index.offset[0] if item.index.fqn in shapes else None))
        return write_item(transforms, stream, data, item, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", recording_write)
    folder = str(tmp_path / "ckpt")
    checkpoint_weights.write_streaming(folder, TINY, 640, torch.float32, make, lambda key: make(key, None),
                                       {"iteration": 0})
    assert len(held_when_producing) == len(shapes) * TINY.num_layers + len(outer)
    assert max(held_when_producing) == 0 and not unwritten, held_when_producing

    stored = checkpoint_weights.stored_tensors(folder)
    for layer in (0, 3):
        for key, tensor in checkpoint_weights.read_layer(folder, TINY, layer, stored).items():
            expected = torch.randn(shapes[key], generator=torch.Generator().manual_seed(hash((key, layer)) % 2**31))
            assert torch.equal(tensor, expected), (key, layer)
    for key, tensor in checkpoint_weights.read_outer(folder, TINY, stored).items():
        expected = torch.randn(outer[key], generator=torch.Generator().manual_seed(hash((key, None)) % 2**31))
        assert torch.equal(tensor, expected), key


# -------------------------------------------------------------------------------------- optimizer state
def test_optimizer_state_survives_save_and_load(tiny_converted, tmp_path):
    """One process: Adam's moments, fp32 main params and step after two steps come back exactly in a fresh
    optimizer, each parameter with a step of its own. Pins the megatron-core optimizer internals
    `checkpointing.load` relies on (`_init_optimizer_states_with_dummy_values`, the fully_reshardable loader, the
    per-parameter `step` of torch's Adam), which the layout-change resume test also exercises at world 2."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from orpo_megatron.parallel import ParallelLayout
    from orpo_megatron.rank_model import build_for_rank

    conversion.init_single_process()
    info = fmt.describe(tiny_converted)

    def build():
        built = build_for_rank(info.hf, ParallelLayout())
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True)
        chunks = [DistributedDataParallel(built.config, ddp_config, c) for c in built.modules]
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                           chunks)
        scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0,
                                            lr_decay_steps=10, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                            wd_incr_steps=10, wd_incr_style="constant")
        return chunks, optimizer, scheduler

    def adam_state(optimizer):
        (inner,) = checkpointing._optimizers(optimizer)
        return [(group["params"][i].detach().clone(), {k: v.clone() for k, v in inner.optimizer.state[p].items()})
                for group in inner.optimizer.param_groups for i, p in enumerate(group["params"])]

    chunks, optimizer, scheduler = build()
    checkpoint_weights.load_model_weights(info, chunks)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for param in chunks[0].parameters():
            param.main_grad.copy_(torch.randn(param.shape, generator=generator))
        optimizer.step()
        scheduler.step(1)
    saved = adam_state(optimizer)
    megatron_args = fmt.megatron_args(info.hf, {}, padded_vocab_size=640, make_vocab_size_divisible_by=128, iteration=2)
    checkpointing.save(str(tmp_path), 2, chunks, optimizer, scheduler, {"layout": "one"}, megatron_args,
                       hf_files_from=info.hf_files)
    # The planner's checkpoint cost is for exactly what this save stores (weights, main params, moments: fp32).
    stored = sum(meta.size.numel() * meta.properties.dtype.itemsize for meta in
                 FileSystemReader(checkpointing.iteration_dir(str(tmp_path), 2)).read_metadata()
                 .state_dict_metadata.values() if isinstance(meta, TensorStorageMetadata))
    plan = estimator.parse_args(["--hf-config", os.path.join(info.hf_files, "config.json"), "--fp32"])
    layout = estimator.make_layout(plan, 1, 1, 1, 1, False, OptimizerMode())
    rates = capacity.hardware(info.hf, plan)
    assert capacity.checkpoint_stall(info.hf, layout, plan, rates, 1.0, 10).stored_bytes == stored

    chunks, optimizer, scheduler = build()
    state = checkpointing.load(checkpointing.resolve(str(tmp_path)), chunks, optimizer, scheduler, "one")
    assert state["iteration"] == 2 and scheduler.num_steps == 2
    loaded = adam_state(optimizer)
    assert len(loaded) == len(saved)
    for (param, moments), (param_back, moments_back) in zip(saved, loaded):
        assert torch.equal(param, param_back)
        assert moments.keys() == moments_back.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in moments:
            assert torch.equal(moments[key], moments_back[key]), key
    (inner,) = checkpointing._optimizers(optimizer)
    steps = [state["step"] for state in inner.optimizer.state.values()]
    assert len({id(step) for step in steps}) == len(steps)  # not one shared tensor


# ---------------------------------------------------------------------------------------- converter input
def test_hf_files_are_copied_from_an_hf_folder_or_another_checkpoint(tiny_mixtral, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    copied = fmt.copy_hf_files(tiny_mixtral, first)
    assert sorted(copied) == ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.model",
                              "tokenizer_config.json"]
    assert sorted(fmt.copy_hf_files(os.path.join(first, fmt.HF_FILES_DIR), second)) == sorted(copied)
    for name in copied:
        with open(os.path.join(second, fmt.HF_FILES_DIR, name), "rb") as copy:
            with open(os.path.join(tiny_mixtral, name), "rb") as source:
                assert copy.read() == source.read(), name


def test_shape_check_names_every_wrong_tensor_and_non_float_dtypes(tmp_path):
    folder = tiny_model.write_tiny_model(str(tmp_path / "hf"), with_tokenizer=False)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(96, 64)
    tensors["model.norm.weight"] = torch.zeros(64, dtype=torch.int64)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    hf = HFModelConfig.from_file(folder)
    reader = HFCheckpointReader(folder)
    reader.check_complete(hf)
    with pytest.raises(MappingError) as err:
        reader.check_shapes(hf)
    wrong_shape = "model.layers.1.block_sparse_moe.experts.3.w2.weight: expected shape (64, 96), got (96, 64)"
    assert wrong_shape in str(err.value)
    assert "model.norm.weight: dtype I64 is not a floating-point type" in str(err.value)


def test_staged_output_appears_only_when_complete(tmp_path):
    target = str(tmp_path / "out")
    ours = ("done", "new")
    with pytest.raises(RuntimeError):
        with conversion.staged_output(target, False, (), ours) as staging:
            open(os.path.join(staging, "part"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []  # neither the output nor the staging folder

    with conversion.staged_output(target, False, (), ours) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and not os.path.exists(target)
        open(os.path.join(staging, "done"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["done"]

    with pytest.raises(conversion.ConversionError, match="already exists; pass --overwrite"):
        with conversion.staged_output(target, False, (), ours):
            pass
    with conversion.staged_output(target, True, (), ours) as staging:
        open(os.path.join(staging, "new"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["new"]
    with pytest.raises(conversion.ConversionError, match="overlaps the input"):
        with conversion.staged_output(target, True, (target,), ours):
            pass


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                           ("1.5 kb", 1500), ("4096", 4096)])
def test_shard_sizes_follow_hugging_face_units(text, expected):
    assert conversion.parse_size(text) == expected


def test_bad_shard_size_is_refused():
    with pytest.raises(conversion.ConversionError, match="--max-shard-size '5 gigs'"):
        conversion.parse_size("5 gigs")


def test_exported_config_records_the_written_dtype():
    v4 = dict(tiny_model.TINY_MIXTRAL_CONFIG, torch_dtype="float32")
    assert conversion.hf_config_with_dtype(v4, torch.bfloat16)["torch_dtype"] == "bfloat16"
    v5 = {k: v for k, v in v4.items() if k != "torch_dtype"} | {"dtype": "float32"}
    written = conversion.hf_config_with_dtype(v5, torch.bfloat16)
    assert written["dtype"] == "bfloat16" and "torch_dtype" not in written
