"""`benchmarks/orpo_vs_trl.py` compares like with like: at every step both sides train on the same token sequences.

Nothing is timed. The benchmark itself checks at run time that both sides' first step gives the same metrics on
the same weights; this test checks the data of every step of an epoch and into the next, through each side's
own data path (our trainer's data pipeline; TRL's tokenization, sampler and collator).
"""
import importlib.util
import os

from conftest import REPO

from orpo_megatron import train
from orpo_megatron.data.pipeline import build_preference_data
from orpo_megatron.data.batching import batch_layout
from orpo_megatron.parallel import ParallelLayout


def load_benchmark():
    spec = importlib.util.spec_from_file_location("orpo_vs_trl", os.path.join(REPO, "benchmarks", "orpo_vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_sides_train_on_the_same_sequences_at_every_step(tiny_mixtral, tmp_path):
    bench = load_benchmark()
    num_pairs, num_steps = 256, 130  # one epoch of 128 steps, and the next epoch's start
    data = bench.write_pairs(str(tmp_path / "pairs.jsonl"), num_pairs)

    args = train.parse_args(["--load", str(tmp_path / "unused"), "--data-path", data, "--tokenizer", tiny_mixtral,
                             "--data-cache-dir", str(tmp_path / "cache"), "--eval-fraction", "0",
                             "--max-length", str(bench.MAX_LENGTH), "--seed", str(bench.DATA_SEED)])
    layout = batch_layout(True, None, ParallelLayout(), False)
    ours, _, _ = build_preference_data(args, None, 0, 1, bench.PAIRS_PER_STEP, bench.PAIRS_PER_STEP, layout,
                                       bench.DATA_SEED)

    trainer = bench.trl_trainer({"hf_dir": tiny_mixtral, "data": data}, str(tmp_path / "trl"), "fp32", num_steps)
    trl_batches = iter(trainer.get_train_dataloader())
    for step in range(num_steps):
        (micro_batch,) = next(ours).micro_batches
        ids, bounds = micro_batch.input_ids[0].tolist(), micro_batch.cu_seqlens.tolist()
        our_sequences = [ids[start:end] for start, end in zip(bounds, bounds[1:])]  # chosen, then rejected

        batch = next(trl_batches)
        trl_sequences = [row[mask.bool()].tolist() for kind in ("chosen", "rejected")
                         for row, mask in zip(batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"])]
        assert our_sequences == trl_sequences, f"step {step + 1}"
    assert sum(map(len, our_sequences)) == micro_batch.num_positions  # packed: no padding on our side
