"""Streaming conversion between Hugging Face folders and model-weights folders, one layer in memory at a time.

Owns both directions, their up-front input validation, the safetensors shard writer, and writing the output
under a temporary name that is renamed only when complete. The tensor mapping is `hf_mapping.py`, the
Megatron-side format `checkpoint_format.py`, the command line `tools/convert_hf.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from safetensors.torch import save_file
from tqdm import tqdm

from orpo_megatron import checkpoint_format as fmt
from orpo_megatron import checkpointing, cpu_backend
from orpo_megatron.hf_mapping import (
    HFCheckpointReader,
    hf_layer_to_megatron,
    hf_outer_names,
    hf_outer_to_megatron,
    megatron_layer_names,
    megatron_layer_to_hf,
    megatron_outer_names,
    megatron_outer_to_hf,
)
from orpo_megatron.model_config import HFModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
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


@contextlib.contextmanager
def staged_output(output: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh folder next to `output`; rename it to `output` only when the body finishes.

    On any error the staging folder is removed, so nothing at `output` ever looks like a finished result.
    """
    output = os.path.abspath(output.rstrip("/") or "/")
    if any(os.path.abspath(path) == output for path in inputs):
        raise ConversionError(f"--output {output} is also the input; choose another output folder")
    if os.path.lexists(output) and not overwrite:
        raise ConversionError(f"output {output} already exists; pass --overwrite to replace it")
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
                   progress: bool = True) -> str:
    """Convert an HF folder (classic or fused expert layout) into a model-weights folder at `output`, stored in
    `dtype` (default: the dtype of the HF tensors, so conversion never changes precision unasked)."""
    hf, reader = validate_hf_folder(hf_dir)
    if dtype is None:
        dtype = reader.read(["model.norm.weight"])["model.norm.weight"].dtype
    init_single_process()
    with staged_output(output, overwrite, inputs=(hf_dir,)) as staging:
        for layer in tqdm(range(hf.num_layers), desc="hf-to-megatron", unit="layer", disable=not progress):
            tensors = hf_layer_to_megatron(reader.read_layer(hf, layer), layer, hf)
            fmt.write_layer(staging, layer, _cast(tensors, dtype))
            del tensors
        # Stored unpadded: padding belongs to the layout that loads it.
        outer = hf_outer_to_megatron(reader.read(hf_outer_names(hf)), hf, padded_vocab=hf.vocab_size)
        fmt.write_outer(staging, _cast(outer, dtype), hf.vocab_size)
        fmt.copy_hf_files(hf_dir, staging)
        fmt.write_metadata(staging, fmt.WeightsMetadata(
            hf_config=hf.raw,
            dtype=str(dtype).removeprefix("torch."),
            produced_by=f"tools/convert_hf.py hf-to-megatron --hf-dir {os.path.abspath(hf_dir)}",
            vocab_size=hf.vocab_size,
        ))
    return os.path.abspath(output)


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


def _check_names(got: dict[str, torch.Tensor], expected: list[str], where: str) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise fmt.CheckpointFormatError(
            f"{where}: " + "; ".join(
                part for part in (missing and f"missing tensors: {', '.join(missing)}",
                                  extra and f"unexpected tensors: {', '.join(extra)}") if part
            )
        )


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
) -> str:
    """Export a model-weights folder to an HF folder in the classic expert layout.

    `load` is a converter output, a training iteration folder, or a training save folder (its newest complete
    iteration). `dtype` None keeps the stored dtype.
    """
    if os.path.isdir(os.path.join(load, fmt.MODEL_DIR)):
        fmt.read_metadata(load)  # names an unfinished weights folder as such
    ckpt = checkpointing.resolve(load).weights_dir
    metadata = fmt.read_metadata(ckpt)
    hf = metadata.model_config()
    dtype = dtype or metadata.torch_dtype
    groups = [fmt.layer_dir(ckpt, layer) for layer in range(hf.num_layers)] + [fmt.outer_dir(ckpt)]
    missing = [path for path in groups if not os.path.isfile(os.path.join(path, ".metadata"))]
    if missing:
        raise fmt.CheckpointFormatError(f"{ckpt}: incomplete, missing: {', '.join(missing)}")
    init_single_process()
    with staged_output(output, overwrite, inputs=(load, ckpt)) as staging:
        writer = SafetensorsShardWriter(staging, max_shard_bytes)
        outer = fmt.read_outer(ckpt)
        _check_names(outer, megatron_outer_names(hf), fmt.outer_dir(ckpt))
        writer.add(_cast(megatron_outer_to_hf(outer, hf), dtype))
        del outer
        for layer in tqdm(range(hf.num_layers), desc="megatron-to-hf", unit="layer", disable=not progress):
            tensors = fmt.read_layer(ckpt, layer)
            _check_names(tensors, megatron_layer_names(hf, layer), fmt.layer_dir(ckpt, layer))
            writer.add(_cast(megatron_layer_to_hf(tensors, layer, hf), dtype))
            del tensors
        writer.finish()
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_with_dtype(metadata.hf_config, dtype), f, indent=2)
        hf_files = os.path.join(ckpt, fmt.HF_FILES_DIR)
        for name in sorted(os.listdir(hf_files)) if os.path.isdir(hf_files) else []:
            shutil.copyfile(os.path.join(hf_files, name), os.path.join(staging, name))
    return os.path.abspath(output)
