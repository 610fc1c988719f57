"""The model-weights folder's metadata and the converter's input checks and output handling, in one process.

Saving and loading tensors at parallel layouts is exercised end to end in test_convert.py (torchrun workers).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from orpo_megatron import checkpoint_format as fmt
from orpo_megatron import conversion, fixtures
from orpo_megatron.hf_mapping import HFCheckpointReader, MappingError
from orpo_megatron.model_config import HFModelConfig


def metadata_for(config: dict, **changes) -> fmt.WeightsMetadata:
    return fmt.WeightsMetadata(hf_config=config, dtype="bfloat16", produced_by="test", vocab_size=600, **changes)


def test_metadata_round_trips_and_names_the_format(tmp_path):
    written = metadata_for(fixtures.TINY_MIXTRAL_CONFIG, iteration=12, padded_vocab_size=768)
    fmt.write_metadata(str(tmp_path), written)
    raw = json.load(open(tmp_path / "metadata.json"))
    assert list(raw)[:2] == ["format", "format_version"] and list(raw)[-1] == "hf_config"
    assert raw["format"] == "orpo-megatron-model-weights" and raw["created"]
    read = fmt.read_metadata(str(tmp_path))
    assert read == written and read.torch_dtype == torch.bfloat16
    assert read.model_config() == HFModelConfig.from_dict(fixtures.TINY_MIXTRAL_CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["metadata.json"]  # no temporary file left


@pytest.mark.parametrize("case,expected", [
    ("missing_dir", "no such directory"),
    ("empty_dir", "is not a model-weights checkpoint"),
    ("unfinished", "is incomplete"),
    ("other_format", "expected 'orpo-megatron-model-weights'"),
    ("newer_version", "format version 99 is newer"),
])
def test_read_metadata_refuses_what_is_not_a_finished_weights_folder(tmp_path, case, expected):
    folder = tmp_path / "ckpt"
    if case != "missing_dir":
        folder.mkdir()
    if case == "unfinished":
        (folder / "model" / "layer_0000").mkdir(parents=True)
    if case == "other_format":  # e.g. a dist_checkpointing folder's own metadata.json
        (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    if case == "newer_version":
        fmt.write_metadata(str(folder), metadata_for(fixtures.TINY_MIXTRAL_CONFIG))
        raw = json.load(open(folder / "metadata.json"))
        (folder / "metadata.json").write_text(json.dumps(dict(raw, format_version=99)))
    with pytest.raises(fmt.CheckpointFormatError, match=expected):
        fmt.read_metadata(str(folder))


def test_loading_into_a_different_model_names_the_differing_fields():
    saved = metadata_for(fixtures.TINY_MIXTRAL_CONFIG)
    other = HFModelConfig.from_dict(dict(fixtures.TINY_MIXTRAL_CONFIG, num_local_experts=8, num_hidden_layers=6))
    with pytest.raises(fmt.CheckpointFormatError) as err:
        fmt.check_model_config(saved, other, "CKPT")
    message = str(err.value)
    assert "num_layers: checkpoint 4, model 6" in message and "num_experts: checkpoint 4, model 8" in message
    fmt.check_model_config(saved, HFModelConfig.from_dict(fixtures.TINY_MIXTRAL_CONFIG), "CKPT")


def test_hf_files_are_copied_from_an_hf_folder_or_another_weights_folder(tiny_mixtral, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    os.makedirs(first)
    copied = fmt.copy_hf_files(tiny_mixtral, first)
    assert sorted(copied) == ["generation_config.json", "special_tokens_map.json", "tokenizer.model",
                              "tokenizer_config.json"]
    fmt.write_metadata(first, metadata_for(fixtures.TINY_MIXTRAL_CONFIG))
    os.makedirs(second)
    assert sorted(fmt.copy_hf_files(first, second)) == sorted(copied)  # reads first/hf_files, not first/
    for name in copied:
        with open(os.path.join(second, "hf_files", name), "rb") as copy:
            with open(os.path.join(tiny_mixtral, name), "rb") as source:
                assert copy.read() == source.read(), name


def test_shape_check_names_every_wrong_tensor_and_non_float_dtypes(tmp_path):
    folder = fixtures.write_tiny_model(str(tmp_path / "hf"), with_tokenizer=False)
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
    with pytest.raises(RuntimeError):
        with conversion.staged_output(target, overwrite=False) as staging:
            open(os.path.join(staging, "part"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []  # neither the output nor the staging folder

    with conversion.staged_output(target, overwrite=False) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and not os.path.exists(target)
        open(os.path.join(staging, "done"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["done"]

    with pytest.raises(conversion.ConversionError, match="already exists; pass --overwrite"):
        with conversion.staged_output(target, overwrite=False):
            pass
    with conversion.staged_output(target, overwrite=True) as staging:
        open(os.path.join(staging, "new"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["new"]
    with pytest.raises(conversion.ConversionError, match="is also the input"):
        with conversion.staged_output(target, overwrite=True, inputs=(target,)):
            pass


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                           ("1.5 kb", 1500), ("4096", 4096)])
def test_shard_sizes_follow_hugging_face_units(text, expected):
    assert conversion.parse_size(text) == expected


def test_bad_shard_size_is_refused():
    with pytest.raises(conversion.ConversionError, match="--max-shard-size '5 gigs'"):
        conversion.parse_size("5 gigs")


def test_exported_config_records_the_written_dtype():
    v4 = dict(fixtures.TINY_MIXTRAL_CONFIG, torch_dtype="float32")
    assert conversion.hf_config_with_dtype(v4, torch.bfloat16)["torch_dtype"] == "bfloat16"
    v5 = {k: v for k, v in v4.items() if k != "torch_dtype"} | {"dtype": "float32"}
    written = conversion.hf_config_with_dtype(v5, torch.bfloat16)
    assert written["dtype"] == "bfloat16" and "torch_dtype" not in written
