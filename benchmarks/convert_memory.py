"""Peak host memory of `tools/convert_hf.py` against the number of layers: it must not grow with the model.

    python benchmarks/convert_memory.py [--layers 2 8] [--hidden-size 512] [--work-dir DIR]

Writes random Mixtral-layout HF folders that differ only in their layer count (4 experts, hidden 512: about
28 MB per layer in fp32), converts each to Megatron and back with the real command line in a fresh process,
and prints each process's peak RSS (ru_maxrss from wait4). Streaming holds about one layer at a time, so the
difference between the largest and smallest model should be about one layer's size, not the size of the
layers added. Export uses --max-shard-size of about one layer, since a whole shard is held while written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOL = os.path.join(REPO, "tools", "convert_hf.py")
MB = 10**6


def peak_rss_bytes(command: list[str]) -> int:
    """Run `command` to completion; its peak resident set size (Linux reports ru_maxrss in KiB).

    Linux carries the parent's high-water RSS into a child across fork + exec, so this process never imports
    torch or holds tensors: its own RSS (a few MB) is then the floor of every figure.
    """
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    proc.stderr.close()
    return usage.ru_maxrss * 1024


def layer_bytes(hf_dir: str) -> int:
    """Bytes of decoder layer 0, from the safetensors header (8-byte length, then JSON with data offsets)."""
    with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(entry["data_offsets"][1] - entry["data_offsets"][0]
               for name, entry in header.items() if name.startswith("model.layers.0."))


def write_model(hf_dir: str, layers: int, hidden_size: int) -> None:
    """The random HF folder, written by a child process so that this one stays small (see below)."""
    overrides = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, head_dim=hidden_size // 8,
                     num_hidden_layers=layers)
    code = ("import sys, json, torch; from orpo_megatron import tiny_model; "
            "tiny_model.write_tiny_model(sys.argv[1], seed=int(sys.argv[2]), dtype=torch.float32, "
            "with_tokenizer=False, config_overrides=json.loads(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, hf_dir, str(layers), json.dumps(overrides)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="Layer counts to compare. Default: 2 8.")
    parser.add_argument("--hidden-size", type=int, default=512, help="Hidden size (FFN is 2x). Default: 512.")
    parser.add_argument("--work-dir", default=None, help="Scratch folder (default: a temporary one, removed).")
    args = parser.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="convert_memory_")
    imports = peak_rss_bytes([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                              "import orpo_megatron.checkpoint.conversion", REPO])
    print(f"imports alone (torch, Megatron-Core, the converter): peak RSS {imports / MB:.1f} MB", flush=True)
    results = {}
    try:
        for layers in args.layers:
            hf_dir = os.path.join(work, f"hf_{layers}")
            write_model(hf_dir, layers, args.hidden_size)
            one_layer = layer_bytes(hf_dir)
            ckpt, back = os.path.join(work, f"megatron_{layers}"), os.path.join(work, f"hf_back_{layers}")
            to_megatron = peak_rss_bytes([sys.executable, TOOL, "hf-to-megatron", "--hf-dir", hf_dir,
                                          "--output", ckpt, "--dtype", "fp32"])
            to_hf = peak_rss_bytes([sys.executable, TOOL, "megatron-to-hf", "--load", ckpt, "--output", back,
                                    "--max-shard-size", str(one_layer)])
            model_bytes = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
            results[layers] = (to_megatron, to_hf, model_bytes)
            print(f"{layers} layers (model {model_bytes / MB:.1f} MB, one layer {one_layer / MB:.1f} MB): peak RSS "
                  f"hf-to-megatron {to_megatron / MB:.1f} MB (+{(to_megatron - imports) / one_layer:.1f} layers over "
                  f"the imports), megatron-to-hf {to_hf / MB:.1f} MB (+{(to_hf - imports) / one_layer:.1f} layers)",
                  flush=True)
            for path in (ckpt, back):
                shutil.rmtree(path)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    small, large = min(results), max(results)
    added = large - small
    for index, direction in ((0, "hf-to-megatron"), (1, "megatron-to-hf")):
        growth = results[large][index] - results[small][index]
        print(f"{direction}: {large} vs {small} layers: peak RSS {growth / MB:+.1f} MB = {growth / one_layer:+.2f} "
              f"layers' worth (the {added} added layers are {added * one_layer / MB:.1f} MB)")


if __name__ == "__main__":
    main()
