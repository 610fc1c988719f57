"""Worker: load a converted checkpoint at a parallel layout, check it, run it, and save it back; for each layout of
`--layouts` in turn (one launch, Megatron's parallel state rebuilt between them).

At the layout given by its --tp/--pp/--vp/--ep (world size from torchrun):
1. builds the tiny model and loads --ckpt with `load_model_weights`; builds a second copy loaded straight from the
   HF safetensors by `reference_weights.load_hf_checkpoint` (no checkpoint file involved) and compares every parameter;
2. computes per-token log-probabilities of --tokens (vocab-parallel logits gathered over TP, padded columns
   sliced off before the log-softmax; at PP>1 through Megatron's pipeline schedule, forward only);
3. with --save, gives each standalone norm an `_extra_state` payload naming its layer, and writes the model as a
   checkpoint root (iteration 7, Megatron-LM's common.pt) from this layout;
4. with --other-ckpt (saved at another layout), loads it into a third copy and compares with the HF-loaded one,
   and each standalone norm's `_extra_state` with the payload its layer was saved with.
Each rank writes <name>/rank<R>.json; the rank holding the last stage's TP/DP rank 0 writes <name>/logps.pt.
"""
import argparse
import json
import os
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from layout_runs import run_each_layout
import reference_weights
from orpo_megatron import model, parallel
from orpo_megatron.checkpoint import format as checkpoint_format
from orpo_megatron.checkpoint import weights as checkpoint_weights
from orpo_megatron.checkpoint import writer as checkpoint_writer
from orpo_megatron.model_config import HFModelConfig
from orpo_megatron.rank_model import build_for_rank

ITERATION = 7


def mismatched_params(chunks, reference_chunks) -> tuple[int, list[str]]:
    """Same layout on both sides: parameters compared entry by entry of their sharded state dicts."""
    checked, bad = 0, []
    for chunk, reference in zip(chunks, reference_chunks):
        for (key, entry), (_, expected) in zip(reference_weights.model_parameters(chunk),
                                               reference_weights.model_parameters(reference)):
            checked += 1
            if not torch.equal(entry.data, expected.data):
                bad.append(f"{key}{tuple(entry.global_offset) if hasattr(entry, 'global_offset') else ''}")
    return checked, bad


def standalone_norms(chunks):
    """(payload naming the norm's layer, norm) for each norm carrying an `_extra_state` (MoE pre-MLP, final)."""
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, model.StandaloneRMSNorm):
                layer = chunk.decoder.layers[int(name.split(".")[2])].layer_number if ".layers." in name else -1
                yield torch.tensor([float(layer), 7.5]), module


def save_weights(root: str, chunks, hf: HFModelConfig, vocab, hf_files_from: str, layout: dict) -> None:
    """The model as a checkpoint root: Megatron-LM's state dict without optimizer, tracker naming iteration 7."""
    metadata = checkpoint_writer.sharded_metadata()
    state = checkpoint_weights.model_state_dicts(chunks, metadata)
    state.update(args=checkpoint_format.megatron_args(hf, layout, padded_vocab_size=vocab.padded_size,
                                                      make_vocab_size_divisible_by=128, iteration=ITERATION),
                 checkpoint_version=checkpoint_format.CHECKPOINT_VERSION, iteration=ITERATION)
    folder = checkpoint_format.iteration_dir(root, ITERATION)
    checkpoint_writer.save(folder, state, metadata)
    if torch.distributed.get_rank() == 0:
        checkpoint_format.copy_hf_files(hf_files_from, folder)
        checkpoint_format.write_tracker(root, ITERATION)
    torch.distributed.barrier()


def token_logps(chunks, tokens: torch.Tensor, true_vocab: int) -> torch.Tensor | None:
    """log p(token t+1 | tokens <= t) for each row, on the last pipeline stage (None elsewhere).

    Runs Megatron's schedule (forward only), one row per micro-batch, so that at PP > 1 the hidden states travel
    through the pipeline exactly as in training (the interleaved schedule needs several micro-batches).
    """
    rows, seq = tokens.shape
    positions = torch.arange(seq)[None]
    collected = []

    def loss_func(ids: torch.Tensor, output: torch.Tensor):
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(output)[..., :true_vocab]
        logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        collected.append(logps)
        return logps.sum(), {}

    def forward_step(data_iterator, chunk):
        ids = next(data_iterator)
        return chunk(ids, positions, attention_mask=None), partial(loss_func, ids)

    micro_batches = list(tokens.split(1))
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
            model=chunks,
            num_microbatches=rows,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    return torch.cat(collected) if collected else None


def run(args: argparse.Namespace) -> None:
    hf = HFModelConfig.from_file(args.hf_dir)
    layout_kwargs = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         virtual_pipeline_model_parallel_size=args.vp, expert_model_parallel_size=args.ep,
                         sequence_parallel=args.tp > 1)
    layout = parallel.initialize(layout_kwargs, hf)
    built = build_for_rank(hf, layout, weights=checkpoint_format.describe(args.ckpt))
    chunks, vocab = built.chunks, built.vocab
    rank = torch.distributed.get_rank()

    reference = build_for_rank(hf, layout).chunks
    reference_weights.load_hf_checkpoint(reference, args.hf_dir, hf)
    checked, bad = mismatched_params(chunks, reference)
    report = {"layout": layout.describe(), "padded_vocab": vocab.padded_size, "params_checked": checked,
              "params_mismatched": bad}

    for chunk in chunks:
        chunk.eval()
    logps = token_logps(chunks, torch.load(args.tokens), hf.vocab_size)
    if (logps is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        torch.save(logps, os.path.join(args.out, "logps.pt"))

    if args.save:
        for payload, norm in standalone_norms(chunks):
            norm.extra_state = payload
        save_weights(args.save, chunks, hf, vocab, args.hf_dir, dict(layout_kwargs, world_size=layout.world_size))
    if args.other_ckpt:
        other = build_for_rank(hf, layout, weights=checkpoint_format.describe(args.other_ckpt)).chunks
        other_checked, other_bad = mismatched_params(other, reference)
        norms = list(standalone_norms(other))
        report.update(other_params_checked=other_checked, other_params_mismatched=other_bad,
                      other_extra_states_checked=len(norms),
                      other_extra_states_mismatched=[payload.tolist() for payload, norm in norms
                                                     if not (torch.is_tensor(norm.extra_state)
                                                             and torch.equal(norm.extra_state, payload))])

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--hf-dir")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--other-ckpt", default=None)
    run_each_layout(parser, run)


if __name__ == "__main__":
    main()
