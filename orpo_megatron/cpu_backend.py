"""CPU backend: lets Megatron-Core 0.16.1 run on CPU-only machines with the gloo backend.

Megatron-Core assumes a CUDA device in many places. On a machine without one (developer laptops, CI) this
module bridges exactly what was seen to fail, and nothing more; it is activated by `activate()` only when
`torch.cuda.is_available()` is False and never touches a GPU run.

What it bridges, and why:
- `torch.cuda.current_device()` is used as a device argument everywhere: it returns the CPU device.
- `torch.cuda.Stream` / `Event` / `stream()` / `synchronize()` (MoE dispatchers, pipeline schedules): no-ops,
  since CPU work is already ordered.
- `torch.cuda.get_rng_state` / `set_rng_state` / `manual_seed` (the tensor-parallel RNG tracker): mapped to the
  CPU generator, so forking the "model-parallel" RNG really switches the generator dropout uses. The tracker's
  "CPU RNG state changed within GPU RNG context" warning is then expected and is filtered.
- Hard-coded `device="cuda"` (causal mask, schedules) and `tensor.cuda()`: a `TorchFunctionMode` rewrites CUDA
  devices to CPU.
- `param.type() == "torch.cuda.FloatTensor"` checks (distributed optimizer, grad clipping): the same mode
  reports CPU tensors under their CUDA type names, which is what those checks mean ("a float32 tensor").
- The `alltoall` MoE token dispatcher hands its split sizes to `all_to_all_single` as numpy arrays, which the
  c10d binding refuses ("incompatible function arguments"); they are passed on as lists. With that (and the
  no-op streams above) the alltoall dispatcher runs on gloo, so CPU runs can use the GPU default.
- Activation recomputation reruns the forward inside autograd's backward, where the torch-function mode is not
  active; the causal mask (the one CUDA tensor created there) is built on CPU at its source.
- With expert tensor parallelism the alltoall dispatcher all-gathers uneven row counts, which gloo refuses: the
  rows are padded to the longest, gathered, and copied out.
- The offloading optimizer (`HybridDeviceOptimizer`) splits its parameters into a device part and a host part by
  `tensor.is_cuda` and pins the host copies. While it splits, its parameters and their detached, cloned or
  fp32 copies report `is_cuda`, copies made with `.cpu()` do not, and `pin_memory()` is a no-op: an offloaded
  CPU run makes the same split, host copies and two sub-optimizers as on a GPU.

What it removes because it only costs time on CPU (results stay bitwise the same; measured on the model of
`benchmarks/orpo_vs_trl.py` at world size 1):
- Megatron's DDP reduce-scatters the gradient buffer and all-gathers the parameters over the data-parallel group
  also when that group is one process, and gloo then still copies the whole buffer (about a tenth of a step).
  Over one process both are identities: they are skipped.
- Megatron's gradient clipping without TE or Apex multiplies each gradient out of place and copies the product
  back; clipping scales a tensor by itself, so it is scaled in place (the same products, one pass, no copy).
- glibc returns large freed blocks to the OS (those above an mmap threshold that adapts up to 32 MiB, and heap
  tops above a trim threshold), so every step page-faults its large temporaries (logits, gradients, Adam's
  intermediates) in again: a fifth of a step. Blocks up to 32 MiB (glibc's highest threshold) come from the heap
  and freed memory is kept for reuse (peak memory is unchanged; it is not given back before exit).

Not here because they are not CPU-specific: the optimizer-state load fix (`checkpoint/training.py`), the router's TE
GEMM name (`model.py`) and the optimizer config's TE version check (`optimizer.py`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CPU tensor types under their CUDA names. While
    `device_tensors` is set (id -> weak reference), those tensors and their copies stand in for CUDA tensors."""

    device_tensors: dict | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if self.device_tensors is not None:
            return self._as_device_tensors(func, args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)

    def _on_device(self, tensor) -> bool:
        ref = self.device_tensors.get(id(tensor))
        return ref is not None and ref() is tensor

    def _as_device_tensors(self, func, args, kwargs):
        if getattr(func, "__self__", None) is torch.Tensor.is_cuda:  # the property's getter
            return self._on_device(args[0])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.cpu:  # a host copy: a new tensor object that is not on the "device"
            return args[0].view_as(args[0])
        result = func(*args, **kwargs)
        if func in (torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.float) and self._on_device(args[0]):
            self.device_tensors[id(result)] = weakref.ref(result)
        return result


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # record_event() / wait_stream() / synchronize(): return another no-op so chained calls work too.
        return lambda *args, **kwargs: _NoOpStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CompletedWork:
    """The handle of an asynchronous collective that needed no communication."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _one_process(group) -> bool:
    return dist.get_world_size(group) == 1


def _coalescing_unless_one_process(coalescing_manager):
    """torch's `_coalescing_manager`, or over one process a context that issues nothing (its collectives are
    the shortcuts below)."""

    @contextlib.contextmanager
    @functools.wraps(coalescing_manager)
    def manager(group=None, device=None, async_ops=False):
        if not _one_process(group):
            with coalescing_manager(group, device, async_ops) as handle:
                yield handle
            return
        yield _CompletedWork()

    return manager


def _shard_collective_unless_one_process(collective):
    """A reduce-scatter or all-gather `(output, input, ...)` of torch.distributed, looked up by name when called
    (so wrappers installed there later see it); over one process the output is the input (in place when they
    share memory, as in Megatron's buffers)."""

    @functools.wraps(collective)
    def shortcut(output, input, *args, group=None, async_op=False, **kwargs):
        if not _one_process(group):
            return getattr(dist, collective.__name__)(output, input, *args, group=group, async_op=async_op,
                                                      **kwargs)
        if output.data_ptr() != input.data_ptr() or output.numel() != input.numel():
            output.copy_(input.view_as(output))
        return _CompletedWork() if async_op else None

    return shortcut


def _scale_in_place_when_aliased(multi_tensor_scale):
    """Megatron-Core's `local_multi_tensor_scale(chunk, flag, [sources, targets], scale)`: `target = source *
    scale`; a target that is its source is multiplied in place."""

    @functools.wraps(multi_tensor_scale)
    def scale_tensors(chunk_size, noop_flag, tensor_lists, scale):
        for source, target in zip(*tensor_lists):
            if source is target:
                target.mul_(scale)
            else:
                target.copy_(source * scale)

    return scale_tensors


def _reuse_freed_host_memory() -> None:
    """glibc's allocator: large blocks from the heap, freed memory kept (see the module docstring)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)  # the top of glibc's own adaptive range; more gained nothing
    mallopt(m_trim_threshold, 1 << 30)


class _TrackerWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.set_stream = lambda *args, **kwargs: None
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    # The tracker's own get/set go through torch.cuda's lazy-init machinery, which never runs without CUDA.
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    logging.getLogger(tp_random.__name__).addFilter(_TrackerWarningFilter())

    # Activation recomputation reruns the forward inside autograd's backward, where the torch-function mode is
    # not active, so the causal mask's hard-coded CUDA device is replaced at its source.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = functools.lru_cache(maxsize=8)(
        lambda sq: torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()
    )

    # The alltoall token dispatcher passes its split sizes as numpy arrays, which the c10d binding refuses.
    all_to_all_single = dist.all_to_all_single

    @functools.wraps(all_to_all_single)
    def all_to_all_single_with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        as_list = lambda splits: None if splits is None else [int(n) for n in splits]  # noqa: E731
        return all_to_all_single(output, input, as_list(output_split_sizes), as_list(input_split_sizes), **kwargs)

    dist.all_to_all_single = all_to_all_single_with_list_splits

    # With expert TP, that dispatcher all-gathers uneven row counts, which gloo's allgather refuses: pad to the
    # longest, gather, and copy each rank's rows out.
    all_gather = dist.all_gather

    @functools.wraps(all_gather)
    def all_gather_uneven_rows(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] if t.dim() else 0 for t in tensor_list]
        if len(set(rows)) <= 1:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        shape = (max(rows), *tensor.shape[1:])
        padded = tensor.new_zeros(shape)
        padded[: tensor.shape[0]] = tensor
        gathered = [tensor.new_empty(shape) for _ in rows]
        all_gather(gathered, padded, group=group)
        for out, full, n in zip(tensor_list, gathered, rows):
            out.copy_(full[:n])
        return None

    dist.all_gather = all_gather_uneven_rows

    # Data-parallel gradient and parameter collectives over one process (see the module docstring). The module
    # bound these names when it was imported, so they are replaced there.
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers._coalescing_manager = _coalescing_unless_one_process(buffers._coalescing_manager)
    buffers.dist_reduce_scatter_func = _shard_collective_unless_one_process(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _shard_collective_unless_one_process(buffers.dist_all_gather_func)

    # Gradient clipping without TE or Apex (see the module docstring).
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _scale_in_place_when_aliased(megatron_utils.local_multi_tensor_scale)

    # The offloading optimizer's device/host split (see the module docstring).
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    split = HybridDeviceOptimizer._get_sub_optimizer_param_groups

    @functools.wraps(split)
    def split_as_on_a_device(self, offload_fraction):
        _ACTIVE_MODE.device_tensors = {id(p): weakref.ref(p) for group in self.param_groups for p in group["params"]}
        try:
            return split(self, offload_fraction)
        finally:
            _ACTIVE_MODE.device_tensors = None

    HybridDeviceOptimizer._get_sub_optimizer_param_groups = split_as_on_a_device


def is_needed() -> bool:
    """True on machines with no CUDA device."""
    return not torch.cuda.is_available()


def activate() -> bool:
    """Activate the bridges if no CUDA device is present. Idempotent; returns whether the backend is active."""
    global _ACTIVE_MODE
    if not is_needed():
        return False
    if _ACTIVE_MODE is None:
        _ACTIVE_MODE = _CudaToCpuMode()
        _patch_torch_cuda()
        _patch_megatron()
        _reuse_freed_host_memory()
        _ACTIVE_MODE.__enter__()
    return True


def is_active() -> bool:
    return _ACTIVE_MODE is not None
