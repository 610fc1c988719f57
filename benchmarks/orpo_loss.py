"""Time and peak memory of the ORPO loss, forward + backward: our vocab-parallel objective vs full log_softmax.

Both variants score the same pairs with the same masks, NLL and odds-ratio code (`orpo_megatron.objective`);
they differ only in how per-token log-probs come out of the logits:
- vocab-parallel (ours, at TP1): `orpo_loss`, i.e. max / sum-exp / target-logit reductions with one fp32
  softmax buffer saved for a backward computed in place;
- full log_softmax (reference): `logits.log_softmax(-1)` over the true vocabulary and `gather`, as TRL and
  most trainers do, with autograd's backward.

How memory is measured: each variant runs in its own fresh process. After the inputs exist, the process
resets its kernel-tracked peak resident set (Linux: `echo 5 > /proc/self/clear_refs` resets VmHWM), runs one
forward + backward, and reports VmHWM minus the resident set before the run: the extra memory the loss
needed at its peak, gradient of the logits included. Tensors this large are mmap'ed and unmapped by glibc on
free, so RSS follows live tensor memory (tracemalloc would miss torch's allocations entirely). Timing is the
median of `--repeats` later runs in the same process.

    python benchmarks/orpo_loss.py                       # vocab 32768, 1 pair x 2048 tokens per sequence
    python benchmarks/orpo_loss.py --seq-length 512 --vocab-size 8192
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("vocab-parallel", "full-log-softmax")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32768, help="true vocabulary (no padding columns)")
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence (chosen and rejected)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement
    return parser.parse_args(argv)


def make_inputs(args: argparse.Namespace):
    """Random fp32 logits [2B, S, V] and a padded micro-batch: 256 prompt tokens, rejected rows 10% shorter."""
    from orpo_megatron.data.micro_batch import padded_rows

    gen = torch.Generator().manual_seed(0)
    rows, seq_len = 2 * args.micro_batch_size, args.seq_length
    lengths = torch.tensor([seq_len] * args.micro_batch_size + [int(seq_len * 0.9)] * args.micro_batch_size)
    positions = torch.arange(seq_len).expand(rows, seq_len)
    attention = positions < lengths[:, None]
    input_ids = torch.randint(3, args.vocab_size, (rows, seq_len), generator=gen).masked_fill(~attention, 2)
    batch = padded_rows(input_ids, attention, attention & (positions >= min(256, seq_len // 2)),
                        list(range(args.micro_batch_size)))
    logits = torch.randn(rows, seq_len, args.vocab_size, generator=gen)
    return logits, batch


def full_log_softmax_loss(logits: torch.Tensor, batch, config) -> torch.Tensor:
    """The same ORPO loss with per-token log-probs from a full log_softmax + gather."""
    from orpo_megatron import objective

    token_logps = torch.gather(logits.log_softmax(-1), 2, batch.labels[..., None]).squeeze(-1)
    pairs = batch.num_pairs
    membership = objective.sequence_membership(batch.sequence_index, 2 * pairs)
    completion = membership & batch.completion_targets.reshape(1, -1)
    logps = objective.per_sequence_sums(token_logps, completion) / completion.sum(-1)
    nll = membership[:pairs] & batch.real_targets.reshape(1, -1)
    nll_sums, nll_counts = -objective.per_sequence_sums(token_logps, nll), nll.sum(-1)
    _, or_losses = objective.odds_ratio(logps[:pairs], logps[pairs:])
    with torch.no_grad():  # TRL's logits metric, as ours computes it too
        logits[:, :-1].mean()
    return nll_sums.sum() / nll_counts.sum() + config.beta * or_losses.mean()


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: peak extra memory of the first forward+backward, then timed repeats."""
    from orpo_megatron.objective import ORPOConfig, orpo_loss

    config = ORPOConfig(vocab_size=args.vocab_size)
    logits, batch = make_inputs(args)
    logits.requires_grad_(True)

    def step() -> float:
        logits.grad = None
        if args.variant == "vocab-parallel":
            loss = orpo_loss(logits, batch, config).loss
        else:
            loss = full_log_softmax_loss(logits, batch, config)
        loss.backward()
        return loss.item()

    before_kib = _resident_kib("VmRSS")
    exact_peak = _reset_peak()
    loss = step()
    peak_kib = _resident_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "loss": loss,
        "peak_extra_mib": (peak_kib - before_kib) / 1024,
        "peak_method": "VmHWM after clear_refs" if exact_peak else "ru_maxrss (peak since process start)",
        "median_s": statistics.median(times),
        "logits_mib": logits.numel() * logits.element_size() / 2**20,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return 0

    print(f"ORPO loss forward+backward on CPU ({torch.get_num_threads()} threads): vocab {args.vocab_size}, "
          f"{args.micro_batch_size} pair(s) x 2 x {args.seq_length} tokens, fp32 logits", flush=True)
    results = []
    for variant in VARIANTS:
        print(f"  measuring {variant} in a fresh process ...", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant,
               "--vocab-size", str(args.vocab_size), "--seq-length", str(args.seq_length),
               "--micro-batch-size", str(args.micro_batch_size), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"  logits tensor itself: {results[0]['logits_mib']:.0f} MiB (not counted below); "
          f"memory method: {results[0]['peak_method']}")
    print(f"  {'variant':<18} {'loss':>12} {'median time (s)':>16} {'peak extra memory (MiB)':>24}")
    for r in results:
        print(f"  {r['variant']:<18} {r['loss']:>12.6f} {r['median_s']:>16.3f} {r['peak_extra_mib']:>24.0f}")
    ours, reference = results
    ratio = ours["peak_extra_mib"] / reference["peak_extra_mib"]
    time_ratio = ours["median_s"] / reference["median_s"]
    print(f"  vocab-parallel uses {ratio:.2f}x the peak extra memory and {time_ratio:.2f}x the time of full log_softmax")
    if abs(ours["loss"] - reference["loss"]) > 1e-5 * abs(reference["loss"]):
        print("ERROR: the two variants disagree on the loss", file=sys.stderr)
        return 1
    if ours["peak_extra_mib"] >= reference["peak_extra_mib"]:
        print("ERROR: the vocab-parallel loss did not use less memory than full log_softmax", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
