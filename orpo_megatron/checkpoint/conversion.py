"""Streaming conversion between Hugging Face folders and Megatron checkpoints, one layer in memory at a time.

Owns both directions, the upgrade of orpo-megatron's first checkpoint format, their up-front input validation,
the safetensors shard writer, and writing the output under a temporary name that is renamed only when
complete. The tensor mapping is the model family's (`families/`) and `hf_mapping.py`'s, the Megatron-side
format `format.py`, the command line `tools/convert_hf.py`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from safetensors.torch import save_file
from tqdm import tqdm

from orpo_megatron.checkpoint import format as fmt

from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron import cpu_backend
from orpo_megatron.checkpoint import legacy as legacy_format
from orpo_megatron.errors import UserError
from orpo_megatron.checkpoint.hf_mapping import (
    EMBEDDING,
    HFCheckpointReader,
    hf_outer_to_megatron,
    megatron_outer_shapes,
    megatron_outer_to_hf,
)
from orpo_megatron.model_config import HFModelConfig, padded_vocab_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What each direction writes into its output folder: all that --overwrite may replace.
MEGATRON_OUTPUT = (fmt.TRACKER_FILE, fmt.RELEASE)
HF_OUTPUT = ("model-*-of-*.safetensors", "model.safetensors.index.json", *fmt.HF_FILE_NAMES)


class ConversionError(UserError, ValueError):
    """A conversion that cannot start: bad arguments or an unusable input or output path, named."""


def init_single_process(seed: int = 1234) -> None:
    """A one-process gloo group and Megatron parallel state (TP = PP = EP = 1).

    Conversion always runs as one process, whatever launcher variables (SLURM_NTASKS, RANK, ...) the calling
    job script has set, so the group is made from an in-memory store rather than the environment.
    """
    cpu_backend.activate()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConversionError(f"conversion runs in one process; this one is in a group of {dist.get_world_size()}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(seed)


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (Hugging Face's convention); KB/MB/GB/TB, KiB/MiB/GiB/TiB or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * powers[unit])


def _contains(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_replaceable(output: str, ours: tuple[str, ...]) -> None:
    """--overwrite replaces a previous output of the same command, never a folder holding anything else."""
    if not os.path.isdir(output) or os.path.islink(output):
        raise ConversionError(f"--output {output} exists and is not a folder; --overwrite replaces only a folder "
                              "this command wrote")
    foreign = sorted(name for name in os.listdir(output) if not any(fnmatch.fnmatch(name, p) for p in ours))
    if foreign:
        raise ConversionError(f"--output {output} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                              f"which this command does not write; --overwrite replaces only its own output "
                              f"({', '.join(ours)}): choose another folder or remove them")


@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, inputs: tuple[str, ...], ours: tuple[str, ...]) -> Iterator[str]:
    """Yield a fresh folder next to `output`; rename it to `output` only when the body finishes.

    `output` may not hold or lie inside an input, and --overwrite replaces only a folder whose entries all match
    `ours` (what this command writes). On any error the staging folder is removed, so nothing at `output` ever
    looks like a finished result.
    """
    output = os.path.realpath(output.rstrip("/") or "/")
    for path in inputs:
        source = os.path.realpath(path)
        if _contains(output, source) or _contains(source, output):
            raise ConversionError(f"--output {output} overlaps the input {source} (one holds the other); choose an "
                                  "output folder outside the input")
    if os.path.lexists(output):
        if not overwrite:
            raise ConversionError(f"output {output} already exists; pass --overwrite to replace it")
        _check_replaceable(output, ours)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.lexists(output):
        replaced = staging + ".replaced"
        os.rename(output, replaced)
        os.rename(staging, output)
        if os.path.isdir(replaced):
            shutil.rmtree(replaced)
        else:
            os.remove(replaced)
    else:
        os.rename(staging, output)


# ----------------------------------------------------------------------------------------------- HF -> Megatron
def validate_hf_folder(hf_dir: str) -> tuple[HFModelConfig, HFCheckpointReader]:
    """Config readable and supported, tensor set complete, every shape as config.json implies."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir}: no such directory")
    hf = HFModelConfig.from_file(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    reader.check_complete(hf)
    reader.check_shapes(hf)
    return hf, reader


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


def hf_to_megatron(hf_dir: str, output: str, dtype: torch.dtype | None = None, overwrite: bool = False,
                   progress: bool = True, make_vocab_size_divisible_by: int = 128) -> str:
    """Convert an HF folder (classic or fused expert layout) into a checkpoint root at `output`: a `release`
    folder with its tracker, which the trainer and Megatron-LM both load. Stored in `dtype` (default: the dtype
    of the HF tensors, so conversion never changes precision unasked), the vocabulary padded as Megatron-LM pads
    it at TP1."""
    hf, reader = validate_hf_folder(hf_dir)
    if dtype is None:
        dtype = reader.read(["model.norm.weight"])["model.norm.weight"].dtype
    tensors = reader.lazy()
    with staged_output(output, overwrite, (hf_dir,), MEGATRON_OUTPUT) as staging:
        init_single_process()
        folder = _write_release(
            staging, hf, dtype, make_vocab_size_divisible_by, "hf-to-megatron", progress,
            layer_tensor=lambda key, layer: hf.family.hf_layer_to_megatron(tensors, layer, keys=[key])[key],
            outer_tensor=lambda key, padded: hf_outer_to_megatron(tensors, hf, padded, keys=[key])[key])
        fmt.copy_hf_files(hf_dir, folder)
    return os.path.abspath(output)


def _write_release(root: str, hf: HFModelConfig, dtype: torch.dtype, make_vocab_size_divisible_by: int, desc: str,
                   progress: bool, layer_tensor: Callable[[str, int], torch.Tensor],
                   outer_tensor: Callable[[str, int], torch.Tensor]) -> str:
    """Stream a model into `root`/release (with Megatron-LM's common.pt for a one-process TP1 checkpoint), then
    point the tracker at it. `outer_tensor(key, padded_vocab)` pads the vocabulary. Returns the folder."""
    padded_vocab = padded_vocab_size(hf.vocab_size, make_vocab_size_divisible_by, 1)
    run = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
               virtual_pipeline_model_parallel_size=None, world_size=1, data_parallel_size=1,
               bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype)
    args = fmt.megatron_args(hf, run, padded_vocab_size=padded_vocab,
                             make_vocab_size_divisible_by=make_vocab_size_divisible_by, iteration=0)
    folder = fmt.iteration_dir(root, fmt.RELEASE)
    total = len(hf.family.megatron_layer_shapes()) * hf.num_layers + len(megatron_outer_shapes(hf, padded_vocab))
    with tqdm(total=total, desc=desc, unit="tensor", disable=not progress) as bar:
        def layer(key: str, index: int) -> torch.Tensor:
            bar.update()
            return layer_tensor(key, index)

        def outer(key: str) -> torch.Tensor:
            bar.update()
            return outer_tensor(key, padded_vocab)

        checkpoint_weights.write_streaming(folder, hf, padded_vocab, dtype, layer, outer,
                            {"args": args, "checkpoint_version": fmt.CHECKPOINT_VERSION, "iteration": 0})
    fmt.write_tracker(root, fmt.RELEASE)
    return folder


# ----------------------------------------------------------------------------------------------- Megatron -> HF
class SafetensorsShardWriter:
    """Writes `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own) and `model.safetensors.index.json`; holds at most one shard in memory."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            # safetensors refuses tensors that share storage (e.g. w1 and w3 cut from one fc1).
            if tensor.untyped_storage().nbytes() != size or not tensor.is_contiguous():
                tensor = tensor.contiguous().clone()
            self.pending[name] = tensor
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards) + 1
        save_file(self.pending, os.path.join(self.out_dir, f"model-{index:05d}.partial"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for index, names in enumerate(self.shards, start=1):
            filename = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.rename(os.path.join(self.out_dir, f"model-{index:05d}.partial"), os.path.join(self.out_dir, filename))
            weight_map.update({name: filename for name in names})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)


def hf_config_with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """config.json content with its dtype field (transformers v4 `torch_dtype`, v5 `dtype`) set."""
    config = dict(config)
    name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    config.update({key: name for key in keys})
    return config


def megatron_to_hf(
    load: str,
    output: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = True,
    hf_config: str | None = None,
) -> str:
    """Export a checkpoint (converted, trained here, or Megatron-LM's at any layout) to an HF folder in the
    classic expert layout, one layer in memory at a time.

    `load` is a checkpoint root (its tracker's folder is used) or a checkpoint folder; `hf_config` the HF
    config.json / folder for a checkpoint without hf_files/. `dtype` None keeps the stored dtype.
    """
    info = fmt.describe(load, hf_config)
    hf = info.hf
    if info.content_metadata.get("singleton_local_shards"):
        raise fmt.CheckpointError(f"{info.folder}: saved with singleton_local_shards=True (one key per layer "
                                        "and expert); export reads the stacked form Megatron-LM writes by default")
    with staged_output(output, overwrite, (load, info.folder, info.hf_files), HF_OUTPUT) as staging:
        init_single_process()
        stored = checkpoint_weights.stored_tensors(info.folder)
        dtype = dtype or stored[EMBEDDING].dtype
        writer = SafetensorsShardWriter(staging, max_shard_bytes)
        writer.add(_cast(megatron_outer_to_hf(checkpoint_weights.read_outer(info.folder, hf, stored), hf), dtype))
        for layer in tqdm(range(hf.num_layers), desc="megatron-to-hf", unit="layer", disable=not progress):
            tensors = checkpoint_weights.read_layer(info.folder, hf, layer, stored)
            writer.add(_cast(hf.family.megatron_layer_to_hf(tensors, layer), dtype))
            del tensors
        writer.finish()
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_with_dtype(hf.raw, dtype), f, indent=2)
        for name in fmt.HF_FILE_NAMES:
            if name != "config.json" and os.path.isfile(os.path.join(info.hf_files, name)):
                shutil.copyfile(os.path.join(info.hf_files, name), os.path.join(staging, name))
    return os.path.abspath(output)


# ---------------------------------------------------------------------------------- earlier format -> now
def upgrade(load: str, output: str, overwrite: bool = False, progress: bool = True,
            make_vocab_size_divisible_by: int = 128) -> str:
    """Rewrite a checkpoint in orpo-megatron's first format (a converted folder, a training iteration folder or
    a training save folder: its newest iteration) as a `release` checkpoint root of today's format.

    Weights, config and tokenizer carry over; that format's optimizer state (per rank, same layout only) does
    not, so training from the result starts a fresh optimizer and schedule.
    """
    source = legacy_format.weights_folder(load)
    hf = legacy_format.model_config(source)
    with staged_output(output, overwrite, (load, source), MEGATRON_OUTPUT) as staging:
        init_single_process()
        folder = _write_release(
            staging, hf, legacy_format.stored_dtype(source), make_vocab_size_divisible_by, "upgrade", progress,
            layer_tensor=lambda key, layer: legacy_format.layer_tensor(source, hf, key, layer),
            outer_tensor=lambda key, padded: legacy_format.outer_tensor(source, key, padded))
        legacy_format.copy_hf_files(source, folder)
    return os.path.abspath(output)
