"""Workers of the GPU acceptance command (`gpu.py`): each runs in a process of its own, does the work
behind some of its table lines and writes what it found as JSON; the checks in gpu.py judge it.

    python acceptance/workers.py NAME --out REPORT.json --work DIR [--dry-run]

DIR is the command's scratch folder, which holds the tiny Mixtral (`fixture`) and the tokenized-data cache.

parity       our model (local and TE spec, fp32 and bf16) against transformers' Mixtral: log-probs, gradients
packing      the trainer's first step on the tiny Mixtral (bf16, this machine's spec): its micro-batches on the
             device, packed against --no-packing, where host syncs of forward/backward come from, a packed FP8 pass
checkpoints  the checkpoint keys of the TE specs against the local spec's, a save on one spec loaded on another,
             TE's FP8 scaling state through a save and a load
throughput   tokens/s of two Mixtral-8x22B-shaped layers per kernel configuration (under torchrun)
memory       GPU bytes each optimizer mode allocates against the memory estimator
A part that cannot run here (no CUDA, no Transformer Engine, no FP8) says why in the report; a part that raised
reports its error, so one broken part does not hide the others.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import json
import os
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from orpo_megatron.tiny_model import TINY_MIXTRAL_CONFIG  # noqa: E402

DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
CONFIG_8X22B = os.path.join(REPO, "tools", "configs", "mixtral-8x22b.json")
SHAPES = ["--max-length", "64", "--max-prompt-length", "48"]
OFFLOAD = ["--use-precision-aware-optimizer", "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"]
# Packed against padded, bf16: every metric but logits/* (relative, absolute below 1) and every gradient (relative to
# the padded gradient's largest entry) within the device's tolerance. CPU: test_packing's bf16 tolerances (the same
# kernels on other shapes). GPU: other kernels (THD against padded attention, other GEMM shapes), so a bound: bf16
# keeps 8 significant bits (unit roundoff u = 2^-8) and each path rounds the hidden state once per op that writes
# it (embedding, attention and MoE of each layer, final norm); to first order the two differ by at most twice
# that many roundings, which the loss's log-softmax and the backward carry through with gain about 1. A top-k
# routing near-tie that flips is outside this bound and shows as a failure to look at.
BF16_UNIT_ROUNDOFF = 2**-8
_ROUNDINGS = 2 * (2 * TINY_MIXTRAL_CONFIG["num_hidden_layers"] + 2)
PACKED_METRIC_TOL = {"cpu": 1e-4, "cuda": _ROUNDINGS * BF16_UNIT_ROUNDOFF}
PACKED_GRAD_TOL = {"cpu": 1e-2, "cuda": _ROUNDINGS * BF16_UNIT_ROUNDOFF}


def fixture(work: str, name: str) -> str:
    """The tiny Mixtral in the command's scratch folder: its HF folder ("hf") or its conversion ("fp32", "bf16")."""
    return os.path.join(work, f"tiny-{name}")


def data_cache(work: str) -> str:
    """The tokenized-data cache every run of the command shares (the trainer runs' too)."""
    return os.path.join(work, "data_cache")


def attempt(part, *inputs) -> dict:
    """What `part(*inputs)` reports, or the error it raised."""
    try:
        return part(*inputs)
    except Exception as err:  # reported, judged by the check
        return {"error": f"{type(err).__name__}: {err}"[:500],
                "where": traceback.format_exc().strip().splitlines()[-3][:200]}


def fp8_unavailable() -> str | None:
    """Why this machine cannot run FP8 (None: it can)."""
    from orpo_megatron import model

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not model.transformer_engine_available():
        return "transformer-engine not installed"
    capability = torch.cuda.get_device_capability()
    if capability < model.FP8_MIN_COMPUTE_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.9"
    return None


# ---------------------------------------------------------------------- the trainer's pieces at world 1
def trainer_args(args: argparse.Namespace, *flags: str) -> argparse.Namespace:
    """The trainer's flags for one step of 8 pairs in micro-batches of 2 from the converted tiny Mixtral in bf16,
    parsed and resolved by the trainer's own parser (its GPU defaults included)."""
    from orpo_megatron import train

    return train.parse_args(["--load", fixture(args.work, "bf16"), "--data-path", DATA,
                             "--data-cache-dir", data_cache(args.work), *SHAPES,
                             "--bf16", "--global-batch-size", "8", "--micro-batch-size", "2", *flags])


def first_step(train_args: argparse.Namespace, hf_files: str):
    """The micro-batches of the trainer's first step for these flags (`TrainStep`), built by its data pipeline."""
    from orpo_megatron.data.pipeline import build_preference_data
    from orpo_megatron.data.batching import batch_layout
    from orpo_megatron.parallel import ParallelLayout

    layout = batch_layout(train_args.packing, train_args.packed_length, ParallelLayout(), bool(train_args.fp8_format))
    iterator, _, _ = build_preference_data(train_args, hf_files, 0, 1, train_args.micro_batch_size,
                                           train_args.global_batch_size, layout, train_args.seed)
    return next(iterator)


def trainer_model(train_args: argparse.Namespace, info, use_te: bool, kernels=None, load: bool = True) -> list:
    """The model chunks the trainer builds for these flags (DDP-wrapped), with the checkpoint's weights unless
    `load` is False; `kernels` None: the trainer's (`FusedKernels.for_backend`)."""
    from orpo_megatron import arguments
    from orpo_megatron.model_config import FusedKernels
    from orpo_megatron.parallel import ParallelLayout
    from orpo_megatron.rank_model import build_for_rank

    return build_for_rank(info.hf, ParallelLayout(), precision=arguments.precision_config(train_args),
                          use_transformer_engine=use_te,
                          make_vocab_size_divisible_by=train_args.make_vocab_size_divisible_by,
                          data_parallel=train_args, weights=info if load else None,
                          moe_aux_loss_coeff=train_args.moe_aux_loss_coeff,
                          moe_token_dispatcher_type=train_args.moe_token_dispatcher_type,
                          kernels=FusedKernels.for_backend(use_te) if kernels is None else kernels).chunks


def training_pass(chunks: list, step, orpo_config):
    """Forward and backward of a step's micro-batches as the trainer's step runs them (no optimizer step)."""
    from orpo_megatron.objective import GlobalNormalizers
    from orpo_megatron.schedule import run_micro_batches

    for chunk in chunks:
        chunk.zero_grad_buffer()
    normalizers = GlobalNormalizers(step.num_pairs, step.num_nll_targets(orpo_config.nll_on_prompt))
    return run_micro_batches(chunks, step.micro_batches, orpo_config, forward_only=False, normalizers=normalizers)


def write_report(args: argparse.Namespace, report: dict) -> None:
    with open(args.out, "w") as f:
        json.dump(report, f)


# ------------------------------------------------------------------------------------------- workers
def worker_parity(args: argparse.Namespace) -> None:
    """Our model (each spec and dtype here) and transformers' Mixtral on the same sequences: per-sequence mean
    completion log-probs and the gradients of the embedding and output weights of the summed log-prob loss."""
    from transformers import AutoModelForCausalLM

    from orpo_megatron import model, parallel
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.data.arguments import DataConfig, add_data_args
    from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
    from orpo_megatron.model_config import FusedKernels, PrecisionConfig
    from orpo_megatron.rank_model import build_for_rank

    info = checkpoint_format.describe(fixture(args.work, "fp32"))
    hf = info.hf
    layout = parallel.initialize({}, hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = DataConfig.from_args(add_data_args(argparse.ArgumentParser()).parse_args(
        ["--data-path", DATA, "--data-cache-dir", data_cache(args.work), *SHAPES]))
    pairs, _ = tokenized_split(data, make_pair_tokenizer(data, fixture(args.work, "hf")), data.split)
    sequences = [(p["prompt_input_ids"], c) for p in pairs.select(range(4))
                 for c in (p["chosen_input_ids"], p["rejected_input_ids"])]
    length = max(len(prompt) + len(completion) for prompt, completion in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    completion = torch.zeros(len(sequences), length, dtype=torch.bool)  # target positions scored
    for row, (prompt, tokens) in enumerate(sequences):
        ids[row, :len(prompt) + len(tokens)] = torch.tensor(prompt + tokens)
        completion[row, len(prompt) - 1:len(prompt) + len(tokens) - 1] = True
    ids, completion = ids.to(device), completion.to(device)

    def score(logits, embedding, output):
        """Per-sequence mean completion log-prob; gradients of the summed log-prob w.r.t. the two weights."""
        log_probs = logits[..., :hf.vocab_size].float().log_softmax(-1)[:, :-1]
        token = log_probs.gather(-1, ids[:, 1:, None])[..., 0] * completion[:, :-1]
        token.sum().backward()
        means = token.sum(-1) / completion[:, :-1].sum(-1)
        grads = [w.main_grad if getattr(w, "main_grad", None) is not None else w.grad for w in (embedding, output)]
        return means.detach().double().cpu(), [g[:hf.vocab_size].detach().double().cpu().flatten() for g in grads]

    reference = {}
    for dtype in ("fp32", "bf16"):
        ref = AutoModelForCausalLM.from_pretrained(fixture(args.work, "hf"),
                                                   dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        ref = ref.to(device).eval()
        reference[dtype] = score(ref(ids).logits, ref.model.embed_tokens.weight, ref.lm_head.weight)
        del ref
    report = {}
    use_te_options = [False] + ([True] if model.transformer_engine_available() else [])
    for use_te in use_te_options:
        for dtype in ("fp32", "bf16"):
            # No DDP here, so no fp32 main_grad buffer for TE's fused gradient accumulation.
            kernels = dataclasses.replace(FusedKernels.for_backend(use_te), gradient_accumulation_fusion=False)
            [chunk] = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=dtype == "bf16"),
                                     use_transformer_engine=use_te, weights=info, kernels=kernels).chunks
            chunk.eval()  # no dropout anyway; grads still flow
            positions = torch.arange(length, device=device).expand_as(ids)
            means, grads = score(chunk(ids, positions, attention_mask=None),
                                 chunk.embedding.word_embeddings.weight, chunk.output_layer.weight)
            cosine = [torch.nn.functional.cosine_similarity(g, r, dim=0).item() for g, r in zip(grads, reference[dtype][1])]
            report[f"{'te' if use_te else 'local'}/{dtype}"] = {
                "logp_vs_same_dtype": (means - reference[dtype][0]).abs().max().item(),
                "logp_vs_fp32": (means - reference["fp32"][0]).abs().max().item(),
                "reference_bf16_vs_fp32": (reference["bf16"][0] - reference["fp32"][0]).abs().max().item(),
                "cos_embedding": cosine[0], "cos_output": cosine[1]}
            del chunk
    with open(args.out, "w") as f:
        json.dump(report, f)
    parallel.destroy()


def worker_packing(args: argparse.Namespace) -> None:
    """The trainer's first step (8 pairs, micro-batches of 2) on the converted tiny Mixtral, world 1, bf16, on this
    machine's spec with the trainer's kernels: the TE spec (THD attention, fused THD RoPE) where TE runs."""
    from orpo_megatron import model, parallel
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.objective import ORPOConfig
    from orpo_megatron.schedule import accelerator

    info = checkpoint_format.describe(fixture(args.work, "bf16"))
    packed_args = trainer_args(args)
    parallel.initialize({}, info.hf, packed_args.seed)
    use_te = model.transformer_engine_available()
    orpo_config = ORPOConfig(vocab_size=info.hf.vocab_size, beta=packed_args.beta)
    chunks = trainer_model(packed_args, info, use_te)
    packed = first_step(packed_args, info.hf_files)
    padded = first_step(trainer_args(args, "--no-packing"), info.hf_files)
    report = {"spec": "TE" if use_te else "local",
              "placement": attempt(batch_placement, packed.micro_batches, accelerator()),
              "packed_vs_padded": attempt(packed_vs_padded, chunks, packed, padded, orpo_config)}
    report["host_syncs"] = (attempt(host_syncs, functools.partial(training_pass, chunks, packed, orpo_config))
                            if torch.cuda.is_available() else {"skipped": "no CUDA device"})
    del chunks
    report["fp8"] = attempt(fp8_packed_pass, args, info, orpo_config)
    write_report(args, report)
    parallel.destroy()


def batch_placement(micro_batches: list, device: torch.device | None) -> dict:
    """Where each `DEVICE_FIELDS` tensor of the micro-batches is after `to_device`, and the tensor fields the
    list leaves out besides the host-only source row numbers (the model or the loss would get them on the host)."""
    from orpo_megatron.data.micro_batch import DEVICE_FIELDS, MicroBatch

    host_only = {"row_index"}  # for error messages and the evaluator's output only
    tensors = {field.name for field in dataclasses.fields(MicroBatch) for batch in micro_batches
               if isinstance(getattr(batch, field.name), torch.Tensor)}
    devices = collections.defaultdict(set)
    for batch in micro_batches:
        moved = batch.to_device(device)
        for name in DEVICE_FIELDS:
            if getattr(moved, name) is not None:
                devices[name].add(str(getattr(moved, name).device))
    return {"devices": {name: sorted(found) for name, found in devices.items()},
            "unlisted": sorted(tensors - set(DEVICE_FIELDS) - host_only)}


def packed_vs_padded(chunks: list, packed, padded, orpo_config) -> dict:
    """One forward/backward of the same pairs packed and padded (`--no-packing`): the largest difference of a metric
    (all but logits/*: TRL averages those over padding positions, which a packed row has none of) and of a
    gradient (relative to the padded gradient's largest entry)."""
    metrics, grads = {}, {}
    for name, step in (("packed", packed), ("padded", padded)):
        metrics[name] = training_pass(chunks, step, orpo_config).metrics(orpo_config)
        grads[name] = {param_name.removeprefix("module."): param.main_grad.detach().float().clone()
                       for chunk in chunks for param_name, param in chunk.named_parameters()}
    metric_differences = {key: abs(metrics["packed"][key] - value) / max(abs(value), 1.0)
                          for key, value in metrics["padded"].items() if not key.startswith("logits/")}
    grad_differences = {key: ((grads["packed"][key] - value).abs().max() / (value.abs().max().item() or 1.0)).item()
                        for key, value in grads["padded"].items()}
    worst_metric = max(metric_differences, key=metric_differences.get)
    worst_grad = max(grad_differences, key=grad_differences.get)
    return {"device": str(next(chunks[0].parameters()).device), "loss": metrics["packed"]["loss"],
            "metric": worst_metric, "metric_difference": metric_differences[worst_metric],
            "grad": worst_grad, "grad_difference": grad_differences[worst_grad],
            "packed_rows": [list(b.input_ids.shape) for b in packed.micro_batches],
            "padded_rows": [list(b.input_ids.shape) for b in padded.micro_batches]}


def host_syncs(step) -> dict:
    """Where the synchronizing CUDA calls of `step()` come from, by owner: {owner: {place: count}}; where the first
    one inside orpo_megatron's own autograd backward is (None: none); and whether syncs planted for both detectors
    were seen.

    Under `torch.cuda.set_sync_debug_mode("warn")` each sync warns while its Python caller is on the stack; the
    owner is the innermost frame's package among orpo_megatron, megatron-core and transformer-engine ("other":
    none of them). Warnings of the backward pass are raised on autograd's device thread and replayed when the
    backward call returns, at its caller (megatron-core's schedule): a sync in orpo_megatron's backward would count
    as megatron-core's there. So the whole step runs again with the backward of each orpo_megatron autograd
    Function under `set_sync_debug_mode("error")`: a sync there raises, and the error's traceback, carried back
    from the device thread, names the line; then once more with a sync planted at the start of those backwards,
    which must raise, or the detector vouches for nothing.
    """
    import megatron.core

    import orpo_megatron

    packages = {"orpo_megatron": os.path.dirname(orpo_megatron.__file__),
                "megatron-core": os.path.dirname(megatron.core.__file__)}
    try:
        import transformer_engine

        packages["transformer-engine"] = os.path.dirname(transformer_engine.__file__)
    except ImportError:
        pass
    found = {owner: collections.Counter() for owner in [*packages, "other"]}

    def place_of(frames: list) -> tuple[str, str] | None:
        """(owner, file:line (function)) of the innermost frame in one of the packages."""
        for frame in reversed(frames):
            match = [name for name, folder in packages.items() if frame.filename.startswith(folder + os.sep)]
            if match:
                root = os.path.dirname(packages[match[0]].removesuffix(os.sep + "core"))
                return match[0], f"{os.path.relpath(frame.filename, root)}:{frame.lineno} ({frame.name})"
        return None

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            owner, place = place_of(traceback.extract_stack()) or ("other", f"{filename}:{lineno}")
            found[owner][place] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones(1, device="cuda").item()  # a known sync: the detector must see it, or it vouches for nothing
            planted = sum(found["other"].values())
            found["other"].clear()
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    backward_sync = first_backward_sync(step, plant=False)
    planted_backward = first_backward_sync(step, plant=True) or []
    return {"planted_sync_seen": planted,
            "backward_sync": backward_sync and (place_of(backward_sync) or ("", str(backward_sync[-1])))[1],
            "planted_backward_sync_seen": any(frame.name == "backward_raising_on_sync" for frame in planted_backward),
            **{owner: dict(places.most_common()) for owner, places in found.items()}}


def orpo_autograd_functions() -> list[type]:
    """orpo_megatron's own autograd Functions among its imported modules (those a step has run)."""
    return [value for name, module in list(sys.modules.items()) if name.startswith("orpo_megatron")
            for value in vars(module).values() if isinstance(value, type)
            and issubclass(value, torch.autograd.Function) and value.__module__ == name]


def first_backward_sync(step, plant: bool) -> list | None:
    """The traceback frames of the first synchronizing call inside the backward of orpo_megatron's autograd
    Functions during `step()`, run with those backwards under `set_sync_debug_mode("error")` (None: no sync there).
    `plant`: each of those backwards first makes a sync of its own."""
    functions = orpo_autograd_functions()
    if not functions:
        raise RuntimeError("no orpo_megatron autograd Function was imported by the step")
    originals = {function: function.__dict__["backward"] for function in functions}

    def under_error_mode(backward):
        def backward_raising_on_sync(ctx, *grads):
            torch.cuda.set_sync_debug_mode("error")
            try:
                if plant:
                    torch.ones(1, device="cuda").item()
                return backward(ctx, *grads)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return staticmethod(backward_raising_on_sync)

    for function, original in originals.items():
        function.backward = under_error_mode(original.__func__)
    try:
        step()
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        return traceback.extract_tb(err.__traceback__)
    finally:
        for function, original in originals.items():
            function.backward = original
    return None


def fp8_packed_pass(args: argparse.Namespace, info, orpo_config) -> dict:
    """The trainer's packed micro-batches with `--fp8-format hybrid` (rows padded to the FP8 length multiple) and,
    where FP8 runs, one forward/backward of them on the TE spec."""
    from orpo_megatron.data.batching import length_multiple

    unavailable = fp8_unavailable()
    if unavailable is None:
        fp8_args = trainer_args(args, "--fp8-format", "hybrid")
    else:  # the trainer refuses the flag here; its batch layout needs only the flag's value
        fp8_args = argparse.Namespace(**{**vars(trainer_args(args)), "fp8_format": "hybrid"})
    step = first_step(fp8_args, info.hf_files)
    report = {"multiple": length_multiple(1, False, True),
              "rows": [[b.input_ids.shape[1], b.num_real_tokens] for b in step.micro_batches]}
    if unavailable is not None:
        return dict(report, skipped=unavailable)

    def forward_backward() -> dict:
        chunks = trainer_model(fp8_args, info, True)
        return {"loss": training_pass(chunks, step, orpo_config).metrics(orpo_config)["loss"]}

    return dict(report, **attempt(forward_backward))


def worker_checkpoints(args: argparse.Namespace) -> None:
    """The checkpoint format on this machine's specs: the local spec everywhere; with TE, the TE spec with
    grouped-GEMM experts (the trainer's default there) and with sequential experts (`moe_grouped_gemm=False`)."""
    from orpo_megatron import model, parallel
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.model_config import FusedKernels

    info = checkpoint_format.describe(fixture(args.work, "bf16"))
    train_args = trainer_args(args)
    parallel.initialize({}, info.hf, train_args.seed)
    specs = {"local": (False, FusedKernels())}
    if model.transformer_engine_available():
        grouped = FusedKernels.for_backend(True)
        specs["TE grouped GEMM"] = (True, grouped)
        specs["TE sequential experts"] = (True, dataclasses.replace(grouped, moe_grouped_gemm=False))
    loaded = {spec: trainer_model(train_args, info, use_te, kernels) for spec, (use_te, kernels) in specs.items()}
    report = {"specs": list(specs), "keys": attempt(spec_keys, loaded),
              "cross_load": attempt(cross_load, train_args, info, specs, loaded, args.work)}
    del loaded
    report["fp8_state"] = attempt(fp8_state_through_save, args, info)
    write_report(args, report)
    parallel.destroy()


def checkpoint_entries(chunks: list) -> tuple[set[str], set[str]]:
    """What a model saves: its tensors (key, global shape and offset) and its objects (`_extra_state`, by unique
    key), as `GPTModel.sharded_state_dict()` gives them to the trainer's save."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from orpo_megatron.checkpoint import weights as checkpoint_weights
    from orpo_megatron.checkpoint import writer as checkpoint_writer

    request = checkpoint_weights.model_state_dicts(chunks, checkpoint_writer.sharded_metadata())
    apply_factories(request)  # gated experts' fc1: saved as two tensors
    entries = list(nested_values(request))
    return ({f"{e.key} {tuple(e.global_shape)} at {tuple(e.global_offset)}" for e in entries
             if isinstance(e, ShardedTensor)},
            {e.unique_key for e in entries if isinstance(e, ShardedObject)})


def spec_keys(loaded: dict) -> dict:
    """Each spec's checkpoint entries (counts) and, for the TE specs, what differs from the local spec's."""
    entries = {spec: checkpoint_entries(chunks) for spec, chunks in loaded.items()}
    local_tensors, local_objects = entries["local"]
    report = {spec: {"tensors": len(tensors), "objects": len(objects),
                     "differing": sorted((tensors ^ local_tensors) | (objects ^ local_objects))[:6],
                     "extra_state_objects": sum(key.split("/")[0].endswith("_extra_state") for key in objects)}
              for spec, (tensors, objects) in entries.items()}
    return report if len(report) > 1 else {"skipped": "transformer-engine not available", **report}


@torch.no_grad()
def forward_logits(chunks: list, ids: torch.Tensor) -> torch.Tensor:
    [chunk] = chunks
    chunk.eval()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = chunk(ids, positions, attention_mask=None).float()
    chunk.train()
    return logits


def cross_load(train_args: argparse.Namespace, info, specs: dict, loaded: dict, work: str) -> dict:
    """Each spec's model (the converted weights) saved with the trainer's writer and loaded into a freshly built
    model of every other spec (with one spec: of the same one): are the loaded weights bitwise those the spec
    loads from the converted checkpoint, and its logits theirs? Also how far the specs' logits are apart."""
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.checkpoint import weights as checkpoint_weights
    from orpo_megatron.checkpoint import writer as checkpoint_writer

    device = next(loaded["local"][0].parameters()).device
    ids = torch.randint(0, info.hf.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    logits = {spec: forward_logits(chunks, ids) for spec, chunks in loaded.items()}
    saves = {}
    for number, (spec, chunks) in enumerate(loaded.items()):
        saves[spec] = dataclasses.replace(info, folder=os.path.join(work, f"spec{number}"),
                                          content_metadata=checkpoint_format.DEFAULT_CONTENT_METADATA)
        checkpoint_writer.save(saves[spec].folder, checkpoint_weights.model_state_dicts(
            chunks, checkpoint_writer.sharded_metadata()), checkpoint_format.DEFAULT_CONTENT_METADATA)
    pairs = [(a, b) for a in specs for b in specs if a != b] or [(spec, spec) for spec in specs]
    loads = []
    for saved_on, loaded_on in pairs:
        use_te, kernels = specs[loaded_on]
        fresh = trainer_model(train_args, info, use_te, kernels, load=False)
        checkpoint_weights.load_model_weights(saves[saved_on], fresh)
        differing = [name for (name, ours), (_, theirs) in zip(fresh[0].named_parameters(),
                                                               loaded[loaded_on][0].named_parameters())
                     if not torch.equal(ours, theirs)]
        reference = logits[loaded_on]
        difference = (forward_logits(fresh, ids) - reference).abs().max() / reference.abs().max()
        loads.append({"saved_on": saved_on, "loaded_on": loaded_on, "weights_differing": differing[:4],
                      "logits_difference": difference.item()})
        del fresh
    specs_apart = {f"{spec} vs local": ((logits[spec] - logits["local"]).abs().max()
                                        / logits["local"].abs().max()).item() for spec in specs if spec != "local"}
    return {"loads": loads, "specs_apart": specs_apart}


def fp8_scaling_state(chunks: list) -> dict[str, torch.Tensor]:
    """Delayed scaling's amax histories and scales of every TE linear module (its `fp8_meta`), by module name.
    Attention is left out: megatron-core does not checkpoint its FP8 state."""
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    state = {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not isinstance(module, TransformerEngineBaseModule) or isinstance(module, te.DotProductAttention):
                continue
            for direction in ("scaling_fwd", "scaling_bwd"):
                meta = module.fp8_meta.get(direction)
                for field in ("amax_history", "scale"):
                    if getattr(meta, field, None) is not None:
                        state[f"{name}.{direction}.{field}"] = getattr(meta, field).detach().cpu().clone()
    return state


def fp8_state_through_save(args: argparse.Namespace, info) -> dict:
    """A TE-spec model trained 3 passes with `--fp8-format hybrid --fp8-recipe delayed`, saved with the trainer's
    writer and loaded into a fresh model as a resume loads it (before any forward): is TE's scaling state equal?"""
    from orpo_megatron.checkpoint import format as checkpoint_format
    from orpo_megatron.checkpoint import weights as checkpoint_weights
    from orpo_megatron.checkpoint import writer as checkpoint_writer
    from orpo_megatron.objective import ORPOConfig

    unavailable = fp8_unavailable()
    if unavailable is not None:
        return {"skipped": unavailable}
    fp8_args = trainer_args(args, "--fp8-format", "hybrid", "--fp8-recipe", "delayed")
    orpo_config = ORPOConfig(vocab_size=info.hf.vocab_size, beta=fp8_args.beta)
    chunks = trainer_model(fp8_args, info, True)
    step = first_step(fp8_args, info.hf_files)
    for _ in range(3):
        training_pass(chunks, step, orpo_config)
    saved = fp8_scaling_state(chunks)
    folder = os.path.join(args.work, "fp8-state")
    checkpoint_writer.save(folder, checkpoint_weights.model_state_dicts(chunks, checkpoint_writer.sharded_metadata()),
                           checkpoint_format.DEFAULT_CONTENT_METADATA)
    fresh = trainer_model(fp8_args, info, True, load=False)
    checkpoint_weights.load_model_weights(
        dataclasses.replace(info, folder=folder, content_metadata=checkpoint_format.DEFAULT_CONTENT_METADATA), fresh)
    restored = fp8_scaling_state(fresh)
    return {"tensors": len(saved), "modules": len({key.rsplit(".", 2)[0] for key in saved}),
            "nonzero_histories": sum(bool(value.any()) for key, value in saved.items() if key.endswith("amax_history")),
            "differing": sorted(key for key, value in saved.items()
                                if key not in restored or not torch.equal(value, restored[key]))[:4],
            "unexpected": sorted(set(restored) - set(saved))[:4]}


def worker_throughput(args: argparse.Namespace) -> None:
    """Tokens/s of two Mixtral-8x22B-shaped layers per kernel configuration (rank 0 writes the report)."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from orpo_megatron import model, parallel, throughput
    from orpo_megatron.model_config import FusedKernels, HFModelConfig, PrecisionConfig
    from orpo_megatron.rank_model import build_for_rank

    hf = dataclasses.replace(HFModelConfig.from_file(CONFIG_8X22B), num_layers=2)
    seq, micro_batches, steps = 2048, 2, 5
    if args.dry_run:  # the same code on CPU in seconds
        hf = dataclasses.replace(hf, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 intermediate_size=256, vocab_size=1024)
        seq, steps = 128, 2
    layout = parallel.initialize({}, hf)
    dp = layout.data_parallel_size
    use_te = model.transformer_engine_available()
    peak = throughput.default_peak_tflops()
    all_on = FusedKernels.for_backend(use_te)
    configs = {"all on": (all_on, dp > 1)}
    toggles = ["moe_grouped_gemm", "moe_permute_fusion", "apply_rope_fusion", "bias_dropout_fusion",
               "gradient_accumulation_fusion", "masked_softmax_fusion", "overlap_grad_reduce", "overlap_param_gather"]
    skipped = {}
    for name in toggles:
        if name.startswith("overlap"):
            if dp == 1:
                skipped[name] = "DP=1 (one GPU): no data-parallel communication to overlap; run with 2+ GPUs"
            else:
                configs[f"{name} off"] = (all_on, False) if name == "overlap_grad_reduce" else (all_on, "grad only")
        elif not use_te:
            skipped[name] = "needs Transformer Engine and a GPU (the local spec runs unfused)"
        elif name == "masked_softmax_fusion":
            skipped[name] = "no effect on the TE spec (TE's attention has its own softmax)"
        elif not getattr(all_on, name):
            skipped[name] = "not available here (gradient accumulation fusion needs Apex's fused_weight_gradient_mlp_cuda)"
        else:
            configs[f"{name} off"] = (dataclasses.replace(all_on, **{name: False}), dp > 1)

    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, hf.vocab_size, (2, seq), generator=generator).to(device)
    positions = torch.arange(seq, device=device).expand_as(ids)

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)
        per_token = chunk(tokens, positions, attention_mask=None, labels=tokens)
        return per_token, lambda output: (output.float().mean(), {})

    report = {"shape": f"hidden {hf.hidden_size}, {hf.num_attention_heads}/{hf.num_key_value_heads} heads, "
                       f"{hf.num_experts} experts top-{hf.num_experts_per_tok}, FFN {hf.intermediate_size}, "
                       f"{seq} tokens x 2 x {micro_batches} micro-batches" + (" (dry run: scaled down)" if args.dry_run else ""),
              "spec": "TE" if use_te else "local", "dp": dp, "toggles": toggles,
              **{f"{name} off": why for name, why in skipped.items()}}
    for name, (kernels, overlap) in configs.items():
        ddp = SimpleNamespace(overlap_grad_reduce=bool(overlap), overlap_param_gather=overlap is True,
                              ddp_bucket_size=None, main_grads_dtype="fp32")
        built = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=True), use_transformer_engine=use_te,
                               data_parallel=ddp, kernels=kernels)
        chunks = built.chunks
        times = []
        for step in range(steps + 2):
            started = time.perf_counter()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids] * micro_batches),
                                        model=chunks, num_microbatches=micro_batches, seq_length=seq,
                                        micro_batch_size=2, forward_only=False)
            if not ddp.overlap_param_gather:  # what the optimizer step ends with; overlapped: the next forward
                for chunk in chunks:
                    chunk.start_param_sync()
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # two warm-up steps
                times.append(time.perf_counter() - started)
        seconds = sum(times) / len(times)
        tokens = 2 * seq * micro_batches * dp
        flops = throughput.training_flops(hf, 2 * micro_batches * dp, seq, built.vocab.padded_size)
        figures = throughput.throughput(tokens, flops, seconds, dist.get_world_size(), peak)
        report[name] = {"tokens_per_second": figures.tokens_per_second, "mfu": figures.mfu, "seconds": seconds}
        del chunks, built
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    parallel.destroy()


def worker_memory(args: argparse.Namespace) -> None:
    """GPU bytes each optimizer mode allocates (its construction and first step) vs the estimator's figure; with
    offload, how many of its host params (copied to the GPU after each step) are pinned."""
    from orpo_megatron import model, optimizer as optimizers, parallel
    from orpo_megatron.planning.memory import MemoryLayout, chunk_parameters, optimizer_bytes_per_element, rank_memory
    from orpo_megatron.model_config import FusedKernels, HFModelConfig, PrecisionConfig
    from orpo_megatron.rank_model import build_for_rank

    hf = dataclasses.replace(HFModelConfig.from_file(CONFIG_8X22B), num_layers=4, hidden_size=1024,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=2048)
    layout = parallel.initialize({}, hf)
    use_te = model.transformer_engine_available()
    modes = {"adam": [], "offload 0.5": OFFLOAD,
             "precision-aware, bf16 moments": ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                                               "--exp-avg-sq-dtype", "bf16"]}
    parser = argparse.ArgumentParser()
    optimizers.add_optimizer_args(parser)
    report = {}
    for name, flags in modes.items():
        if name.startswith("precision-aware") and not use_te:
            report[name] = "transformer-engine not installed (TE's FusedAdam)"
            continue
        opt_args = parser.parse_args(flags)
        opt_args.lr, opt_args.min_lr = 1e-4, 0.0
        ddp = SimpleNamespace(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=None,
                              main_grads_dtype=opt_args.main_grads_dtype)
        built = build_for_rank(hf, layout, precision=PrecisionConfig(bf16=True), use_transformer_engine=use_te,
                               data_parallel=ddp, kernels=FusedKernels.for_backend(use_te))
        chunks = built.chunks
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        optimizer = optimizers.build_optimizer(opt_args, chunks, True, torch.bfloat16)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.step()
        torch.cuda.synchronize()
        real = torch.cuda.memory_allocated() - before
        mode = optimizers.OptimizerMode.from_args(opt_args)
        estimate = rank_memory(hf, MemoryLayout.planned(optimizer=mode), 0)
        # Offload moves whole parameter shards: allow the largest one; otherwise 1% (allocator rounding, scales).
        largest = max(p.numel for p in chunk_parameters(hf, MemoryLayout.planned(), 0))
        per_element = optimizer_bytes_per_element(mode, True)
        slack = (largest * (per_element.gpu_main_params + per_element.gpu_state) / (1 - mode.offload_fraction)
                 if 0 < mode.offload_fraction < 1 else 0)
        expected = estimate.main_param_bytes + estimate.optimizer_state_bytes
        pinned = [param.is_pinned() for hybrid in optimizers.hybrid_optimizers(optimizer)
                  for sub in hybrid.cpu_optimizers for group in sub.param_groups for param in group["params"]]
        report[name] = {"real": real, "estimate": expected, "tolerance": max(slack, 0.01 * expected),
                        "host_params": len(pinned), "host_params_pinned": sum(pinned)}
        del optimizer, chunks, built
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(report, f)
    parallel.destroy()


WORKERS = {"parity": worker_parity, "packing": worker_packing, "checkpoints": worker_checkpoints,
           "throughput": worker_throughput, "memory": worker_memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("worker", choices=WORKERS)
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--work", required=True, help="the command's scratch folder (data cache, checkpoints)")
    parser.add_argument("--dry-run", action="store_true", help="throughput: tiny sizes, on CPU")
    args = parser.parse_args(argv)
    WORKERS[args.worker](args)


if __name__ == "__main__":
    main()
