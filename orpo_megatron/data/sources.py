"""Where preference rows come from: `--data-path` + `--split` -> a `datasets.Dataset` of raw rows.

Owns the accepted sources and their errors: a `.json` / `.jsonl` / `.parquet` file (its one split is `train`), a
folder of such files (splits from file names, as `datasets` infers them: `train*.jsonl`, `test*.jsonl`, ...), a
folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hub dataset name that is already in the
local `datasets` cache. Nothing is downloaded: clusters often have no network at run time. It does not look at the
columns (`preference.py`).
"""
from __future__ import annotations

import os

import datasets
from datasets.packaged_modules.cache.cache import Cache

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _data_files_in(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if os.path.splitext(name)[1] in FILE_BUILDERS)


def _select_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, data_path: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--data-path {data_path} has splits {sorted(loaded)}, not {split!r} "
                             "(--split/--eval-split)")
        return loaded[split]
    _require_train(split, data_path)
    return loaded


def _require_train(split: str, data_path: str) -> None:
    if split != "train":
        raise ValueError(f"--data-path {data_path} holds a single dataset, which is split 'train', not {split!r}; "
                         "use --eval-fraction to hold out evaluation pairs")


def _load_file(path: str, split: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(os.path.splitext(path)[1])
    if builder is None:
        raise ValueError(f"--data-path {path}: expected a .json, .jsonl or .parquet file")
    _require_train(split, path)
    return datasets.load_dataset(builder, data_files={"train": path}, split="train")


def _load_folder(folder: str, split: str) -> datasets.Dataset:
    if any(os.path.isfile(os.path.join(folder, marker))
           for marker in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return _select_split(datasets.load_from_disk(folder), split, folder)
    files = _data_files_in(folder)
    if not files:
        raise ValueError(f"--data-path {folder} has no .json/.jsonl/.parquet files and is not a saved dataset")
    builders = {FILE_BUILDERS[os.path.splitext(path)[1]] for path in files}
    if len(builders) > 1:
        raise ValueError(f"--data-path {folder} mixes file types {sorted(builders)}; keep one format per folder")
    return _select_split(datasets.load_dataset(folder), split, folder)


def _load_cached_hub(name: str, split: str) -> datasets.Dataset:
    cache_dir = datasets.config.HF_DATASETS_CACHE
    not_cached = (f"--data-path {name!r} is neither a local file/folder nor a dataset in the local datasets cache "
                  f"({cache_dir}, set by HF_DATASETS_CACHE). Nothing is downloaded at run time: on a machine with "
                  f"network run `python -c \"import datasets; datasets.load_dataset('{name}')\"` with the same "
                  "HF_DATASETS_CACHE, or save the data to a .jsonl/.parquet file and pass its path")
    if name.count("/") > 1:
        raise ValueError(not_cached)
    try:
        builder = Cache(cache_dir=str(cache_dir), dataset_name=name.split("/")[-1], repo_id=name,
                        version="auto", hash="auto")
    except ValueError as error:
        raise ValueError(not_cached) from error
    available = list(builder.info.splits or [])
    if split not in available:
        raise ValueError(f"--data-path {name} (cached in {builder.cache_dir}) has splits {available}, not {split!r}")
    return builder.as_dataset(split=split)


def load_split(data_path: str, split: str) -> datasets.Dataset:
    """The raw rows of one split of `data_path`."""
    if os.path.isfile(data_path):
        return _load_file(data_path, split)
    if os.path.isdir(data_path):
        return _load_folder(data_path, split)
    if os.path.splitext(data_path)[1] in FILE_BUILDERS or data_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--data-path {data_path}: no such file or folder")
    return _load_cached_hub(data_path, split)
