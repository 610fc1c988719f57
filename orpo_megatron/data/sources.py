"""Where preference rows come from: `--data-path` + `--split` -> a `datasets.Dataset` of raw rows.

Owns the accepted sources and their errors: a `.json` / `.jsonl` / `.parquet` file (its one split is `train`), a
folder of such files (splits from file names, as `datasets` infers them: `train*.jsonl`, `test*.jsonl`, ...), a
folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hub dataset name that is already in the
local `datasets` cache. Nothing is downloaded: clusters often have no network at run time. It does not look at the
columns (`preference.py`).

Also owns what identifies a split's content (`SourceSplit.digest`): a hash of the bytes of every local file, so a
file rewritten with its modification time kept (`cp -p`, `rsync -t`, coarse-mtime file systems) is read anew, not
served from the `datasets` cache (which keys local files by path and mtime). A JSON-lines file keeps one row per
non-blank line; a line that is not UTF-8 or not one JSON object becomes a row with only `UNREADABLE_COLUMN` set,
so the bad-row policy counts or names it like any other bad row.
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.cache.cache import Cache

from orpo_megatron.errors import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
UNREADABLE_COLUMN = "unreadable_line"  # set only on the rows of lines that could not be read, to what was wrong
_READ_ERRORS = (DatasetGenerationError, pyarrow.ArrowException, UnicodeDecodeError, StopIteration)
_CHUNK = 1 << 24


def default_cache_dir() -> str:
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "orpo_megatron")


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    rows: datasets.Dataset
    digest: str  # changes whenever the content of the split changes


def _local_files(data_path: str) -> list[str]:
    if os.path.isfile(data_path):
        return [data_path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(data_path) for name in names)


def _content_digest(data_path: str) -> tuple[str, bool]:
    """(sha256 over every file's relative path, size and bytes, whether the bytes are all UTF-8)."""
    digest, utf8 = hashlib.sha256(), True
    for path in _local_files(data_path):
        digest.update(f"{os.path.relpath(path, data_path)}\0{os.path.getsize(path)}\0".encode())
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if utf8:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError:
                        utf8 = False
    return digest.hexdigest()[:32], utf8


def _line_problem(line: bytes) -> str | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, expected one JSON object per line"


def _readable_copy(path: str, target: str) -> bool:
    """Write `path` to `target` with each unreadable line replaced by a row naming its problem, if it has any
    (returns whether it had). Written under a name of this process's, so ranks that do this at once do not mix."""
    replaced = 0
    partial = f"{target}.{os.getpid()}.partial"
    with open(path, "rb") as source, open(partial, "wb") as out:
        for number, line in enumerate(source, start=1):
            problem = _line_problem(line) if line.strip() else None
            if problem is not None:
                line = (json.dumps({UNREADABLE_COLUMN: f"line {number} of {path} is {problem}"}) + "\n").encode()
                replaced += 1
            out.write(line if line.endswith(b"\n") else line + b"\n")
    if replaced:
        os.replace(partial, target)
    else:
        os.remove(partial)
    return bool(replaced)


def _data_files_in(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if os.path.splitext(name)[1] in FILE_BUILDERS)


def _select_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, data_path: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"--data-path {data_path} has splits {sorted(loaded)}, not {split!r} "
                             "(--split/--eval-split)")
        return loaded[split]
    _require_train(split, data_path)
    return loaded


def _require_train(split: str, data_path: str) -> None:
    if split != "train":
        raise DataError(f"--data-path {data_path} holds a single dataset, which is split 'train', not {split!r}; "
                         "use --eval-fraction to hold out evaluation pairs")


def _build(path: str, builder_cache: str, *args, **kwargs) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_dataset` into a cache folder of this content (not the path + mtime key of `datasets`)."""
    try:
        return datasets.load_dataset(*args, cache_dir=builder_cache, **kwargs)
    except _READ_ERRORS as err:
        cause = err.__cause__ or err
        raise DataError(f"--data-path {path}: cannot be read as a dataset ({type(cause).__name__}: {cause})") \
            from None


def _load_file(path: str, split: str, cache_dir: str) -> SourceSplit:
    extension = os.path.splitext(path)[1]
    builder = FILE_BUILDERS.get(extension)
    if builder is None:
        raise DataError(f"--data-path {path}: expected a .json, .jsonl or .parquet file")
    _require_train(split, path)
    digest, utf8 = _content_digest(path)
    source_cache = os.path.join(cache_dir, "sources", digest)
    if extension == ".json" and not utf8:
        raise DataError(f"--data-path {path} is not UTF-8 text; expected JSON (as a .jsonl file, its unreadable lines "
                        "would be bad rows)")
    if extension == ".jsonl":
        try:
            if utf8:
                return SourceSplit(_build(path, source_cache, "json", data_files={"train": path}, split="train"),
                                   digest)
        except DataError:
            pass  # find the lines that cannot be read
        os.makedirs(source_cache, exist_ok=True)
        readable = os.path.join(source_cache, "readable.jsonl")  # of this content: written once
        if os.path.isfile(readable) or _readable_copy(path, readable):
            return SourceSplit(_build(path, source_cache, "json", data_files={"train": readable}, split="train"),
                               digest)
    return SourceSplit(_build(path, source_cache, builder, data_files={"train": path}, split="train"), digest)


def _has_text(path: str) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if chunk.strip():
                return True
    return False


def _names_local(data_path: str) -> bool:
    return os.path.exists(data_path) or os.path.splitext(data_path)[1] in FILE_BUILDERS \
        or data_path.startswith((".", "/", "~"))


def check_present(data_path: str) -> None:
    """The checks of `load_split` that cost nothing (a local path that is missing, a file that is empty), for a
    command to make before it builds a model."""
    if _names_local(data_path) and not os.path.exists(data_path):
        raise DataError(f"--data-path {data_path}: no such file or folder")
    if os.path.isfile(data_path) and not _has_text(data_path):
        raise DataError(f"--data-path {data_path} is empty; expected preference rows (one JSON object per line with "
                        "prompt/chosen/rejected)")


def _load_folder(folder: str, split: str, cache_dir: str) -> SourceSplit:
    content, _ = _content_digest(folder)
    digest = f"{content}/{split}"  # one folder, several splits
    if any(os.path.isfile(os.path.join(folder, marker))
           for marker in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return SourceSplit(_select_split(datasets.load_from_disk(folder), split, folder), digest)
    files = _data_files_in(folder)
    if not files:
        raise DataError(f"--data-path {folder} has no .json/.jsonl/.parquet files and is not a saved dataset")
    builders = {FILE_BUILDERS[os.path.splitext(path)[1]] for path in files}
    if len(builders) > 1:
        raise DataError(f"--data-path {folder} mixes file types {sorted(builders)}; keep one format per folder")
    loaded = _build(folder, os.path.join(cache_dir, "sources", content), folder)
    return SourceSplit(_select_split(loaded, split, folder), digest)


def _load_cached_hub(name: str, split: str) -> SourceSplit:
    cache_dir = datasets.config.HF_DATASETS_CACHE
    not_cached = (f"--data-path {name!r} is neither a local file/folder nor a dataset in the local datasets cache "
                  f"({cache_dir}, set by HF_DATASETS_CACHE). Nothing is downloaded at run time: on a machine with "
                  f"network run `python -c \"import datasets; datasets.load_dataset('{name}')\"` with the same "
                  "HF_DATASETS_CACHE, or save the data to a .jsonl/.parquet file and pass its path")
    if name.count("/") > 1:
        raise DataError(not_cached)
    try:
        builder = Cache(cache_dir=str(cache_dir), dataset_name=name.split("/")[-1], repo_id=name,
                        version="auto", hash="auto")
    except ValueError as error:
        raise DataError(not_cached) from error
    available = list(builder.info.splits or [])
    if split not in available:
        raise DataError(f"--data-path {name} (cached in {builder.cache_dir}) has splits {available}, not {split!r}")
    rows = builder.as_dataset(split=split)
    return SourceSplit(rows, rows._fingerprint)  # the Hub cache is written once per dataset revision


def load_split(data_path: str, split: str, cache_dir: str | None = None) -> SourceSplit:
    """The raw rows of one split of `data_path` and their content digest; `cache_dir` (default
    `default_cache_dir()`) holds what `datasets` builds from local files, per content."""
    cache_dir = cache_dir or default_cache_dir()
    check_present(data_path)
    if os.path.isfile(data_path):
        return _load_file(data_path, split, cache_dir)
    if os.path.isdir(data_path):
        return _load_folder(data_path, split, cache_dir)
    return _load_cached_hub(data_path, split)
