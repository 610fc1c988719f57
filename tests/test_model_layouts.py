"""The same weights give the same logits and gradients at every parallel layout, and match transformers.

Each layout runs `workers/model_layouts.py` under torchrun: forward + backward of the tiny Mixtral loaded from
its HF checkpoint, compared on every rank with transformers' MixtralForCausalLM (logits, and each local
gradient shard against the sharded transformers gradient). The gathered logits of every layout are also
compared with the single-process layout's.
"""
import glob
import json
import os

import pytest
import torch

LAYOUTS = {  # name: (world, TP, PP, EP, VP, MoE token dispatcher)
    "tp2_sp": (2, 2, 1, 1, None, "alltoall"),
    "pp2": (2, 1, 2, 1, None, "alltoall"),
    "pp2_vp2": (2, 1, 2, 1, 2, "alltoall"),
    "ep2_dp2_alltoall": (2, 1, 1, 2, None, "alltoall"),
    "ep2_dp2_allgather": (2, 1, 1, 2, None, "allgather"),
    "tp2_ep2_dp2_alltoall": (4, 2, 1, 2, None, "alltoall"),
    "tp2_ep2_dp2_allgather": (4, 2, 1, 2, None, "allgather"),
}
LOGITS_TOL = 1e-5  # fp32, max abs
GRAD_REL_TOL = 1e-4  # fp32, max abs diff / max abs value of the reference tensor


def run_layout(torchrun, hf_dir, out_dir, world, tp, pp, ep, vp, dispatcher) -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    args = ["--hf-dir", hf_dir, "--out", out_dir, "--tp", str(tp), "--pp", str(pp), "--ep", str(ep),
            "--dispatcher", dispatcher]
    if vp:
        args += ["--vp", str(vp)]
    torchrun("model_layouts.py", world, *args)
    reports = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out_dir, "rank*.json")))]
    assert len(reports) == world
    return reports


def load_logits(out_dir) -> dict:
    logits = {}
    for path in glob.glob(os.path.join(out_dir, "logits_dp*.pt")):
        logits.update(torch.load(path))
    return logits


@pytest.fixture(scope="module")
def single_process_logits(torchrun, tiny_mixtral, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tp1"))
    reports = run_layout(torchrun, tiny_mixtral, out, 1, 1, 1, 1, None, "alltoall")
    assert reports[0]["logits_max_abs_diff"] <= LOGITS_TOL
    assert reports[0]["grad_max_rel_diff"] <= GRAD_REL_TOL, reports[0]
    return load_logits(out)


def test_single_process_matches_transformers(single_process_logits):
    assert sorted(single_process_logits) == [0, 1]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_and_transformers(name, torchrun, tiny_mixtral, tmp_path, single_process_logits):
    reports = run_layout(torchrun, tiny_mixtral, str(tmp_path), *LAYOUTS[name])
    for report in reports:
        assert report["logits_max_abs_diff"] <= LOGITS_TOL, report
        assert report["grad_max_rel_diff"] <= GRAD_REL_TOL, report
        assert report["grads_checked"] > 0
    logits = load_logits(str(tmp_path))
    assert sorted(logits) == [0, 1]
    for index, value in logits.items():
        assert (value - single_process_logits[index]).abs().max().item() <= LOGITS_TOL
