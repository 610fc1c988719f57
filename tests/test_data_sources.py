"""Where rows come from (files, folders, saved datasets, the local Hub cache), the tokenization cache, and the
one call the trainer makes."""
import argparse
import glob
import json
import os
import shutil

import datasets
import pytest
import torch

from orpo_megatron.data import add_data_args, build_preference_data
from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.batching import BatchLayout
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.data.preference import TruncationConfig
from orpo_megatron.data.sources import load_split

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")
CAPYBARA = os.path.join(EXAMPLES, "capybara_style.jsonl")


@pytest.fixture(scope="module")
def reference_rows():
    with open(CAPYBARA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_local_source_form_gives_the_same_rows(tmp_path, reference_rows):
    datasets.Dataset.from_list(reference_rows).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.json").write_text(json.dumps(reference_rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(CAPYBARA, folder / "train.jsonl")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference_rows[:7]))
    datasets.Dataset.from_list(reference_rows).save_to_disk(str(tmp_path / "saved"))
    saved_dict = datasets.DatasetDict({"train": datasets.Dataset.from_list(reference_rows)})
    saved_dict.save_to_disk(str(tmp_path / "saved_dict"))
    for path in (CAPYBARA, tmp_path / "rows.parquet", tmp_path / "rows.json", folder, tmp_path / "saved",
                 tmp_path / "saved_dict"):
        assert load_split(str(path), "train").rows.to_list() == reference_rows, path
    assert load_split(str(folder), "test").rows.to_list() == reference_rows[:7]
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_split(str(folder), "validation")
    with pytest.raises(ValueError, match="single dataset, which is split 'train', not 'test'.*--eval-fraction"):
        load_split(CAPYBARA, "test")
    with pytest.raises(ValueError, match="no such file"):
        load_split(str(tmp_path / "missing.jsonl"), "train")


def test_hub_name_is_read_from_the_local_cache_only(tmp_path, monkeypatch, reference_rows):
    # Lay out a cache entry the way `datasets.load_dataset("org/capy")` leaves it:
    # <org>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow
    staging = tmp_path / "staging"
    datasets.load_dataset("json", data_files={"train": CAPYBARA}, cache_dir=str(staging))
    built = glob.glob(str(staging / "json" / "*" / "*" / "*"))[0]
    cached = tmp_path / "hub_cache" / "org___capy" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(built, cached)
    for arrow in glob.glob(str(cached / "json-*.arrow")):
        os.rename(arrow, arrow.replace("json-", "capy-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hub_cache")
    assert load_split("org/capy", "train").rows.to_list() == reference_rows
    with pytest.raises(ValueError, match=r"org/not-downloaded.*nor a dataset in the local datasets cache.*Nothing is "
                                         r"downloaded"):
        load_split("org/not-downloaded", "train")


def test_tokenization_is_cached_by_content_and_settings(tmp_path, tiny_mixtral):
    data = tmp_path / "rows.jsonl"
    shutil.copy(CAPYBARA, data)
    cache = tmp_path / "cache"

    def cache_file(**changes):
        config = DataConfig(data_path=str(data), cache_dir=str(cache), **changes)
        pairs, stats = tokenized_split(config, make_pair_tokenizer(config, tiny_mixtral), "train")
        assert stats.rows == len(open(data, encoding="utf-8").readlines())  # the rows the file holds now
        return {os.path.basename(f["filename"]) for f in pairs.cache_files}

    first = cache_file()
    stamp = {name: os.path.getmtime(cache / name) for name in first}
    assert cache_file() == first and stamp == {name: os.path.getmtime(cache / name) for name in first}  # reused
    shorter = cache_file(truncation=TruncationConfig(max_length=40, max_prompt_length=20))
    other_template = cache_file(chat_template="chatml")
    stamp = os.stat(data)
    with open(data, "w", encoding="utf-8") as f:  # new content, fewer rows
        f.writelines(open(CAPYBARA, encoding="utf-8").readlines()[:20])
    # ... with the modification time kept (cp -p, rsync -t): `datasets` keys local files by path and mtime only
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    grown = cache_file()
    assert len({frozenset(first), frozenset(shorter), frozenset(other_template), frozenset(grown)}) == 4


def test_splits_of_one_folder_are_tokenized_apart(tmp_path, tiny_mixtral):
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = open(CAPYBARA, encoding="utf-8").readlines()
    (folder / "train.jsonl").write_text("".join(lines[:12]))
    (folder / "test.jsonl").write_text("".join(lines[12:17]))
    config = DataConfig(data_path=str(folder), cache_dir=str(tmp_path / "cache"))
    pair_tokenizer = make_pair_tokenizer(config, tiny_mixtral)
    assert [tokenized_split(config, pair_tokenizer, split)[1].rows for split in ("train", "test")] == [12, 5]


def _parse(*flags):
    return add_data_args(argparse.ArgumentParser()).parse_args(list(flags))


def test_build_preference_data_for_two_dp_ranks(tmp_path, tiny_mixtral):
    args = _parse("--data-path", CAPYBARA, "--eval-fraction", "0.1", "--data-cache-dir", str(tmp_path),
                  "--max-length", "64", "--max-prompt-length", "32")
    built = [build_preference_data(args, tiny_mixtral, rank, 2, micro_batch_size=2, global_batch_size=8,
                                   layout=BatchLayout(packing=False, length_multiple=4), seed=5) for rank in range(2)]
    (train0, eval0, stats), (train1, eval1, _) = built
    assert stats.train.rows == 300 and stats.train.bad_rows == {}
    assert (stats.train_pairs, stats.eval_pairs, stats.eval_pairs_dropped) == (270, 30, 0)
    assert stats.train.chosen_truncated + stats.train.rejected_truncated > 0  # some multi-turn pairs exceed 64
    train_rows = set(train0.pairs["row_index"])
    eval_rows = [r for shard in (eval0, eval1) for mb in shard for r in mb.row_index.tolist()]
    assert len(eval_rows) == 30 and not set(eval_rows) & train_rows and len(train_rows | set(eval_rows)) == 300
    step0, step1 = next(train0).micro_batches, next(train1).micro_batches
    assert len(step0) == len(step1) == 2
    for micro_batch in step0 + step1:
        assert micro_batch.input_ids.shape[0] == 4 and micro_batch.input_ids.shape[1] % 4 == 0
        assert max(micro_batch.sequence_lengths) <= 64
        assert micro_batch.input_ids[:, 0].eq(1).all()  # BOS first on every row
    assert stats.as_dict()["data/train_pairs"] == 270 and "pairs from 300 rows" in stats.summary()


def test_tokenizer_defaults_to_the_checkpoint_folder_and_must_exist(tmp_path, tiny_mixtral):
    args = _parse("--data-path", CAPYBARA, "--data-cache-dir", str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer: pass --tokenizer"):
        build_preference_data(args, None, 0, 1, 1, 8, BatchLayout(), 0)
    args = _parse("--data-path", CAPYBARA, "--data-cache-dir", str(tmp_path), "--tokenizer", tiny_mixtral)
    train, evaluation, _ = build_preference_data(args, "/nonexistent", 0, 1, 1, 8, BatchLayout(), 0)
    assert evaluation is None and isinstance(next(train).micro_batches[0].input_ids, torch.Tensor)


def test_message_rows_without_any_template_are_a_clear_error(tmp_path, tiny_mixtral):
    folder = tmp_path / "no_template"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_mixtral, "tokenizer.model"), folder)
    config = json.load(open(os.path.join(tiny_mixtral, "tokenizer_config.json")))
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    args = _parse("--data-path", CAPYBARA, "--data-cache-dir", str(tmp_path), "--tokenizer", str(folder))
    with pytest.raises(ValueError, match="no chat template: pass --chat-template zephyr"):
        build_preference_data(args, None, 0, 1, 1, 8, BatchLayout(), 0)
    args = _parse("--data-path", CAPYBARA, "--data-cache-dir", str(tmp_path), "--tokenizer", str(folder),
                  "--chat-template", "zephyr")
    assert build_preference_data(args, None, 0, 1, 1, 8, BatchLayout(), 0)[2].train_pairs == 300


def test_multiprocess_tokenization_equals_single_process(tmp_path, tiny_mixtral):
    tables = []
    for workers in (1, 2):
        config = DataConfig(data_path=CAPYBARA, cache_dir=str(tmp_path / f"cache{workers}"), num_workers=workers)
        pairs, _ = tokenized_split(config, make_pair_tokenizer(config, tiny_mixtral), "train")
        tables.append(pairs.to_list())
    assert tables[0] == tables[1] and len(tables[0]) == 300
