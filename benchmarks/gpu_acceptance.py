"""GPU acceptance: one command on a machine with an NVIDIA GPU, one table of what works there and how fast.

    python benchmarks/gpu_acceptance.py              # one or more GPUs, no internet; under 10 minutes
    python benchmarks/gpu_acceptance.py --dry-run    # CPU: the same code at tiny sizes (CI runs this)

Needs this repository's requirements; transformers for the parity lines, transformer-engine for the TE, FP8
and fused-kernel lines. A line whose piece is missing says "skipped: why", never a fake pass; a failed check
says FAIL with the error, and the command exits 1. The lines:
(a) parity: forward and backward of the tiny Mixtral against transformers' Mixtral, fp32 and bf16, on the
    local spec and (with TE) the TE spec: per-sequence completion log-probs and the gradients of the
    embedding and output weights;
(b) trainer: for each optimizer mode, a bf16 run from a converted checkpoint at lr 1e-9 keeps the loaded
    weights (held-out loss unchanged after a step), and a run saved at step 2 resumes to the same losses;
    batches reach the GPU (the trainer's forward raises on any host tensor);
(c) FP8 (TE, compute capability 8.9+): for each recipe, steps, a save and a resume that continues with the
    saved FP8 scaling state;
(d) throughput: tokens/s and MFU of two Mixtral-8x22B-shaped layers (real hidden size, heads, experts, FFN;
    bf16; one pair of 2048-token sequences per micro-batch, 2 micro-batches; forward, backward and the
    data-parallel communication, not the optimizer's arithmetic), with every fused kernel on, then each one
    off (on/off ratio), and the DP communication overlaps on/off (with 2+ GPUs; one GPU has none);
(e) memory: for each optimizer mode, the GPU bytes the optimizer really allocates (CUDA allocator, after its
    first step) against `memory_estimate`'s figure, on a 4-layer Mixtral-shaped model.
Adding a line: write a function that yields `Line`s (raise `Skip("why")` for a missing piece) and decorate it
with `@check(section)`; checks run in the order they are defined.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from typing import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

DATA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
CONFIG_8X22B = os.path.join(REPO, "tools", "configs", "mixtral-8x22b.json")
SHAPES = ["--max-length", "64", "--max-prompt-length", "48"]
OFFLOAD = ["--use-precision-aware-optimizer", "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"]
OPTIMIZER_MODES = {"adam": [], "offload": OFFLOAD, "precision-aware": ["--use-precision-aware-optimizer"]}
# Tolerances. Per-sequence mean completion log-prob (nats/token): fp32 like the CPU tests; bf16 within 0.02 of
# transformers' bf16 model and no further from the fp32 truth than twice transformers' own bf16 run. Gradient
# cosine similarity to transformers'. Losses of a resumed run against the straight run: bit-exact on CPU; GPU
# kernels may reorder reductions, so 1e-4 there (a lost optimizer or FP8 state moves them far more).
FP32_LOGP, BF16_LOGP, BF16_VS_FP32_FACTOR = 1e-4, 0.02, 2.0
FP32_GRAD_COSINE, BF16_GRAD_COSINE = 0.9999, 0.99
UNCHANGED_LOSS = 1e-5
RESUME_LOSS = {"cpu": 1e-6, "cuda": 1e-4}


# ------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Line:
    check: str
    result: str  # "pass", "FAIL: ...", "skipped: ...", or a figure
    detail: str = ""


class Skip(Exception):
    """A check whose piece is missing here; the message says which."""


CHECKS: list[tuple[str, Callable]] = []


def check(section: str):
    def register(fn):
        CHECKS.append((section, fn))
        return fn
    return register


@dataclasses.dataclass
class Machine:
    dry_run: bool
    work: str
    cuda: bool
    gpus: int
    device_name: str
    capability: tuple[int, int] | None
    transformer_engine: str | None
    transformers: bool
    deadline: float
    converted: dict = dataclasses.field(default_factory=dict)  # dtype -> converted tiny checkpoint
    results: dict = dataclasses.field(default_factory=dict)  # what later lines reuse

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("no CUDA device")

    def need_transformer_engine(self) -> None:
        self.need_cuda()
        if not self.transformer_engine:
            raise Skip("transformer-engine not installed (pip install 'orpo-megatron[te]')")


# ------------------------------------------------------------------------------------------ helpers
def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: " + " | ".join(tail))
    return proc


def train(machine: Machine, save: str, *flags: str, load_dtype: str = "bf16") -> dict:
    """One trainer run (single process, the GPU's defaults); its logged events by (iteration, kind)."""
    run([sys.executable, "-m", "orpo_megatron.train", "--load", machine.converted[load_dtype], "--save", save,
         "--data-path", DATA, "--data-cache-dir", os.path.join(machine.work, "data_cache"), *SHAPES,
         "--global-batch-size", "4", "--log-interval", "1", *flags], timeout=max(60, machine.deadline - time.time()))
    events = {}
    for row in map(json.loads, open(os.path.join(save, "metrics.jsonl"))):
        kind = "eval" if "eval/loss" in row else "train" if "train/loss" in row else None
        if kind:
            events[row["iteration"], kind] = row
    return events


def resume_difference(machine: Machine, name: str, *flags: str) -> float:
    """Largest |loss| difference of steps 3-4 between a straight 4-step run and one resumed from its step 2."""
    from orpo_megatron import checkpoint_format, checkpointing

    straight, resumed = (os.path.join(machine.work, f"{name}-{kind}") for kind in ("straight", "resumed"))
    common = ["--bf16", "--lr", "1e-3", "--lr-warmup-iters", "1", "--train-iters", "4", "--save-interval", "2", *flags]
    expected = train(machine, straight, *common)
    os.makedirs(resumed)
    shutil.copytree(checkpointing.iteration_dir(straight, 2), checkpointing.iteration_dir(resumed, 2))
    checkpoint_format.write_tracker(resumed, 2)
    got = train(machine, resumed, *common)
    if {i for i, kind in got if kind == "train"} != {3, 4}:
        raise RuntimeError(f"the resumed run logged steps {sorted(got)}, not 3 and 4")
    return max(abs(got[i, "train"]["train/loss"] - expected[i, "train"]["train/loss"]) for i in (3, 4))


# ---------------------------------------------------------------------------------------- the checks
@check("machine")
def machine_line(machine: Machine) -> Iterator[Line]:
    capability = ".".join(map(str, machine.capability)) if machine.capability else "-"
    yield Line("device", f"{machine.gpus} x {machine.device_name}" if machine.cuda else "CPU (no CUDA device)",
               f"compute capability {capability}; torch {torch.__version__}; transformer-engine "
               f"{machine.transformer_engine or 'not installed'}" + ("; DRY RUN (tiny sizes)" if machine.dry_run else ""))


@check("(a) parity")
def parity(machine: Machine) -> Iterator[Line]:
    if not machine.transformers:
        raise Skip("transformers not installed (the reference)")
    out = os.path.join(machine.work, "parity.json")
    run([sys.executable, __file__, "--worker", "parity", "--out", out, "--load", machine.converted["fp32"],
         "--hf-dir", machine.converted["hf"]], timeout=600)
    report = json.load(open(out))
    for spec in ("local", "te"):
        for dtype in ("fp32", "bf16"):
            name = f"{spec} spec, {dtype}"
            if spec == "te" and not (machine.cuda and machine.transformer_engine):
                yield Line(name, "skipped: " + ("no CUDA device" if not machine.cuda else "transformer-engine not installed"))
                continue
            r = report[f"{spec}/{dtype}"]
            detail = (f"log-prob max |diff| {r['logp_vs_same_dtype']:.2e} (vs transformers {dtype}), "
                      f"{r['logp_vs_fp32']:.2e} (vs fp32; transformers' own bf16: {r['reference_bf16_vs_fp32']:.2e}); "
                      f"grad cosine embedding {r['cos_embedding']:.6f}, output {r['cos_output']:.6f}")
            if dtype == "fp32":
                ok = (r["logp_vs_same_dtype"] <= FP32_LOGP and min(r["cos_embedding"], r["cos_output"]) >= FP32_GRAD_COSINE)
            else:
                ok = (r["logp_vs_same_dtype"] <= BF16_LOGP
                      and r["logp_vs_fp32"] <= BF16_VS_FP32_FACTOR * r["reference_bf16_vs_fp32"]
                      and min(r["cos_embedding"], r["cos_output"]) >= BF16_GRAD_COSINE)
            yield Line(name, "pass" if ok else "FAIL: outside the stated tolerances", detail)


@check("(b) trainer")
def trainer_modes(machine: Machine) -> Iterator[Line]:
    for mode, flags in OPTIMIZER_MODES.items():
        if mode == "precision-aware" and not (machine.cuda and machine.transformer_engine):
            reason = "no CUDA device" if not machine.cuda else "transformer-engine not installed"
            yield Line(f"{mode}: bf16 keeps loaded weights", f"skipped: {reason} (TE's FusedAdam)")
            yield Line(f"{mode}: save + exact resume", f"skipped: {reason}")
            continue
        if machine.dry_run and mode != "adam":
            yield Line(f"{mode}: bf16 keeps loaded weights", "skipped: dry run (tests/test_bf16.py runs it on CPU)")
            yield Line(f"{mode}: save + exact resume", "skipped: dry run (tests/test_bf16.py runs it on CPU)")
            continue
        events = train(machine, os.path.join(machine.work, f"keep-{mode}"), "--bf16", "--lr", "1e-9", "--train-iters",
                       "1", "--eval-fraction", "0.1", "--eval-interval", "1", "--eval-iters", "4", *flags)
        before, after = events[0, "eval"]["eval/loss"], events[1, "eval"]["eval/loss"]
        yield Line(f"{mode}: bf16 keeps loaded weights", "pass" if abs(after - before) <= UNCHANGED_LOSS else
                   "FAIL: the held-out loss moved at lr 1e-9", f"held-out loss {before:.6f} -> {after:.6f} after a step")
        machine.results["trainer ran"] = True
        difference = resume_difference(machine, f"resume-{mode}", *flags)
        tolerance = RESUME_LOSS[machine.device]
        yield Line(f"{mode}: save + exact resume", "pass" if difference <= tolerance else "FAIL: resumed losses differ",
                   f"steps 3-4 loss max |diff| {difference:.2e} (tolerance {tolerance:g})")
    if not machine.cuda:
        yield Line("batches on the device", "skipped: no CUDA device (on CPU every tensor is on the host)")
    elif machine.results.get("trainer ran"):
        yield Line("batches on the device", "pass", "the trainer's steps ran on cuda; a host tensor in its forward "
                   "raises a device mismatch")


@check("(c) FP8")
def fp8(machine: Machine) -> Iterator[Line]:
    from orpo_megatron.model import FP8_MIN_COMPUTE_CAPABILITY

    for recipe in ("delayed", "tensorwise"):
        name = f"{recipe}: steps, save, resume with FP8 state"
        if not (machine.cuda and machine.transformer_engine):
            yield Line(name, "skipped: " + ("no CUDA device" if not machine.cuda else "transformer-engine not installed"))
            continue
        if machine.capability < FP8_MIN_COMPUTE_CAPABILITY:
            yield Line(name, f"skipped: compute capability {machine.capability} < 8.9")
            continue
        difference = resume_difference(machine, f"fp8-{recipe}", "--fp8-format", "hybrid", "--fp8-recipe", recipe)
        tolerance = RESUME_LOSS["cuda"]
        yield Line(name, "pass" if difference <= tolerance else "FAIL: resumed losses differ",
                   f"steps 3-4 loss max |diff| {difference:.2e} (tolerance {tolerance:g})")
    if machine.cuda and machine.transformer_engine and machine.capability >= FP8_MIN_COMPUTE_CAPABILITY:
        output = os.path.join(machine.work, "fp8-scores.jsonl")
        run([sys.executable, "-m", "orpo_megatron.evaluate", "--load", os.path.join(machine.work, "fp8-delayed-straight"),
             "--data-path", DATA, "--data-cache-dir", os.path.join(machine.work, "data_cache"), *SHAPES, "--bf16",
             "--fp8-format", "hybrid", "--output", output], timeout=300)
        summary = json.load(open(output + ".summary.json"))
        yield Line("evaluator with --fp8-format", "pass" if math.isfinite(summary["loss"]) else "FAIL: loss not finite",
                   f"{summary['pairs']} pairs scored, loss {summary['loss']:.4f}")


@check("(d) throughput")
def throughput_lines(machine: Machine) -> Iterator[Line]:
    out = os.path.join(machine.work, "throughput.json")
    nproc = 2 if machine.dry_run else machine.gpus  # the dry run exercises the DP > 1 lines with 2 CPU processes
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
         "--worker", "throughput", "--out", out] + (["--dry-run"] if machine.dry_run else []), timeout=600)
    report = json.load(open(out))
    base = report["all on"]
    shape = report["shape"]
    mfu = f", MFU {base['mfu']:.1%}" if base["mfu"] is not None else ", MFU: no peak known for this device"
    yield Line("2 Mixtral-8x22B layers", f"{base['tokens_per_second']:,.0f} tok/s",
               f"{shape}; {report['spec']} spec, bf16, DP={report['dp']}, all kernels on{mfu}; "
               f"{base['seconds']:.3f} s/step")
    for name in report["toggles"]:
        off = report.get(f"{name} off")
        if isinstance(off, str):
            yield Line(f"{name} on/off", f"skipped: {off}")
            continue
        ratio = base["tokens_per_second"] / off["tokens_per_second"]
        yield Line(f"{name} on/off", f"{ratio:.2f}x",
                   f"on {base['tokens_per_second']:,.0f} tok/s, off {off['tokens_per_second']:,.0f} tok/s")


@check("(e) memory")
def optimizer_memory(machine: Machine) -> Iterator[Line]:
    machine.need_cuda()
    out = os.path.join(machine.work, "memory.json")
    run([sys.executable, __file__, "--worker", "memory", "--out", out], timeout=600)
    for mode, r in json.load(open(out)).items():
        if isinstance(r, str):
            yield Line(f"{mode}: optimizer GPU bytes", f"skipped: {r}")
            continue
        ok = abs(r["real"] - r["estimate"]) <= r["tolerance"]
        yield Line(f"{mode}: optimizer GPU bytes", "pass" if ok else "FAIL: the estimate is off",
                   f"allocated {r['real'] / 2**20:,.1f} MiB, estimated {r['estimate'] / 2**20:,.1f} MiB "
                   f"(tolerance {r['tolerance'] / 2**20:,.1f} MiB)")


# ------------------------------------------------------------------------------------------- workers
def worker_parity(args: argparse.Namespace) -> None:
    """Our model (each spec and dtype here) and transformers' Mixtral on the same sequences: per-sequence mean
    completion log-probs and the gradients of the embedding and output weights of the summed log-prob loss."""
    from transformers import AutoModelForCausalLM

    from orpo_megatron import checkpoint_format, model, parallel
    from orpo_megatron.data.arguments import DataConfig, add_data_args
    from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
    from orpo_megatron.model_config import FusedKernels, PrecisionConfig, build_transformer_config

    info = checkpoint_format.describe(args.load)
    hf = info.hf
    parallel.initialize({}, hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = DataConfig.from_args(add_data_args(argparse.ArgumentParser()).parse_args(["--data-path", DATA, *SHAPES]))
    pairs, _ = tokenized_split(data, make_pair_tokenizer(data, args.hf_dir), data.split)
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
        ref = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        ref = ref.to(device).eval()
        reference[dtype] = score(ref(ids).logits, ref.model.embed_tokens.weight, ref.lm_head.weight)
        del ref
    report = {}
    use_te_options = [False] + ([True] if model.transformer_engine_available() else [])
    for use_te in use_te_options:
        for dtype in ("fp32", "bf16"):
            # No DDP here, so no fp32 main_grad buffer for TE's fused gradient accumulation.
            kernels = dataclasses.replace(FusedKernels.for_backend(use_te), gradient_accumulation_fusion=False)
            config = build_transformer_config(hf, precision=PrecisionConfig(bf16=dtype == "bf16"), kernels=kernels)
            [chunk] = model.build_model(config, hf, model.vocab_info(hf, 128, 1), use_te)
            checkpoint_format.load_model_weights(info, [chunk])
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


def worker_throughput(args: argparse.Namespace) -> None:
    """Tokens/s of two Mixtral-8x22B-shaped layers per kernel configuration (rank 0 writes the report)."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from orpo_megatron import model, parallel, throughput, train
    from orpo_megatron.model_config import FusedKernels, HFModelConfig, PrecisionConfig, build_transformer_config

    hf = dataclasses.replace(HFModelConfig.from_file(CONFIG_8X22B), num_layers=2)
    seq, micro_batches, steps = 2048, 2, 5
    if args.dry_run:  # the same code on CPU in seconds
        hf = dataclasses.replace(hf, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 intermediate_size=256, vocab_size=1024)
        seq, steps = 128, 2
    layout = parallel.initialize({}, hf)
    dp = layout.data_parallel_size
    use_te = model.transformer_engine_available()
    vocab = model.vocab_info(hf, 128, 1)
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
        config = build_transformer_config(hf, precision=PrecisionConfig(bf16=True), kernels=kernels)
        ddp = SimpleNamespace(overlap_grad_reduce=bool(overlap), overlap_param_gather=overlap is True,
                              ddp_bucket_size=None, main_grads_dtype="fp32")
        chunks = train.wrap_data_parallel(config, ddp, model.build_model(config, hf, vocab, use_te))
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
        flops = throughput.training_flops(hf, 2 * micro_batches * dp, seq, vocab.padded_size)
        figures = throughput.throughput(tokens, flops, seconds, dist.get_world_size(), peak)
        report[name] = {"tokens_per_second": figures.tokens_per_second, "mfu": figures.mfu, "seconds": seconds}
        del chunks, config
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    parallel.destroy()


def worker_memory(args: argparse.Namespace) -> None:
    """GPU bytes each optimizer mode allocates (its construction and first step) vs the estimator's figure."""
    from orpo_megatron import model, optimizer as optimizers, parallel, train
    from orpo_megatron.memory_estimate import MemoryLayout, chunk_parameters, optimizer_bytes_per_element, rank_memory
    from orpo_megatron.model_config import FusedKernels, HFModelConfig, PrecisionConfig, build_transformer_config

    hf = dataclasses.replace(HFModelConfig.from_file(CONFIG_8X22B), num_layers=4, hidden_size=1024,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=2048)
    parallel.initialize({}, hf)
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
        config = build_transformer_config(hf, precision=PrecisionConfig(bf16=True),
                                          kernels=FusedKernels.for_backend(use_te))
        ddp = SimpleNamespace(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=None,
                              main_grads_dtype=opt_args.main_grads_dtype)
        chunks = train.wrap_data_parallel(config, ddp, model.build_model(config, hf, model.vocab_info(hf, 128, 1), use_te))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        optimizer = optimizers.build_optimizer(opt_args, chunks, True, torch.bfloat16)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.step()
        torch.cuda.synchronize()
        real = torch.cuda.memory_allocated() - before
        mode = optimizers.OptimizerMode.from_args(opt_args)
        estimate = rank_memory(hf, MemoryLayout(optimizer=mode), 0)
        # Offload moves whole parameter shards: allow the largest one; otherwise 1% (allocator rounding, scales).
        largest = max(p.numel for p in chunk_parameters(hf, MemoryLayout(), 0))
        per_element = optimizer_bytes_per_element(mode, True)
        slack = (largest * (per_element.gpu_main_params + per_element.gpu_state) / (1 - mode.offload_fraction)
                 if 0 < mode.offload_fraction < 1 else 0)
        expected = estimate.main_param_bytes + estimate.optimizer_state_bytes
        report[name] = {"real": real, "estimate": expected, "tolerance": max(slack, 0.01 * expected)}
        del optimizer, chunks, config
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(report, f)
    parallel.destroy()


# --------------------------------------------------------------------------------------------- main
def describe_machine(dry_run: bool, work: str, budget_minutes: float) -> Machine:
    cuda = torch.cuda.is_available()
    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        from orpo_megatron.model import _installed_transformer_engine

        te = _installed_transformer_engine()
    return Machine(dry_run=dry_run, work=work, cuda=cuda, gpus=torch.cuda.device_count() if cuda else 0,
                   device_name=torch.cuda.get_device_name() if cuda else "CPU",
                   capability=torch.cuda.get_device_capability() if cuda else None, transformer_engine=te,
                   transformers=importlib.util.find_spec("transformers") is not None,
                   deadline=time.time() + 60 * budget_minutes)


def prepare_fixtures(machine: Machine) -> None:
    """The tiny Mixtral (HF folder) and its conversions to our format in fp32 and bf16."""
    from orpo_megatron import fixtures

    hf_dir = fixtures.write_tiny_model(os.path.join(machine.work, "tiny-hf"), seed=1234)
    machine.converted["hf"] = hf_dir
    for dtype in ("fp32", "bf16"):
        out = os.path.join(machine.work, f"tiny-{dtype}")
        run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "hf-to-megatron", "--hf-dir", hf_dir,
             "--output", out, "--dtype", dtype], timeout=300)
        machine.converted[dtype] = out


def print_table(lines: list[tuple[str, Line]]) -> None:
    widths = [max(len(section) for section, _ in lines), min(45, max(len(line.check) for _, line in lines)),
              min(40, max(len(line.result) for _, line in lines))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(("section", "check", "result"), widths)) + "  detail")
    for section, line in lines:
        print("  ".join(v.ljust(w) for v, w in zip((section, line.check, line.result), widths)) + "  " + line.detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on CPU at tiny sizes (what CI exercises)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--budget-minutes", type=float, default=9.5,
                        help="checks not started within this many minutes are skipped (the command's budget is 10)")
    parser.add_argument("--worker", choices=["parity", "throughput", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"parity": worker_parity, "throughput": worker_throughput, "memory": worker_memory}[args.worker](args)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to exercise the checks on CPU")

    work = args.work_dir or tempfile.mkdtemp(prefix="gpu-acceptance-")
    os.makedirs(work, exist_ok=True)
    machine = describe_machine(args.dry_run, work, args.budget_minutes)
    prepare_fixtures(machine)
    lines: list[tuple[str, Line]] = []
    started = time.time()

    def add(section: str, line: Line) -> None:
        lines.append((section, line))
        print(f"[{time.time() - started:4.0f} s] {section} | {line.check} | {line.result} | {line.detail}", flush=True)

    for section, fn in CHECKS:
        name = fn.__name__.replace("_", " ")
        try:
            if time.time() > machine.deadline:
                raise Skip(f"time budget of {args.budget_minutes:g} minutes spent")
            for line in fn(machine):
                add(section, line)
        except Skip as why:
            add(section, Line(name, f"skipped: {why}"))
        except Exception as err:  # one broken check must not hide the others
            add(section, Line(name, f"FAIL: {type(err).__name__}: {err}"[:300],
                              traceback.format_exc().strip().splitlines()[-1][:200]))
    print_table(lines)
    print(f"\n{len(lines)} lines in {time.time() - started:.0f} s on {machine.device_name}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(line.result.startswith("FAIL") for _, line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
