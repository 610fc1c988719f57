"""The same weights give the same logits and gradients at every parallel layout, and match transformers.

The layouts of one world size run in one torchrun launch of `workers/model_layouts.py` (a launch costs seconds of
imports per process): forward + backward of the tiny Mixtral loaded from its HF checkpoint at each layout (and of
the tiny Qwen3-MoE and Qwen2-MoE at TP2 x EP2), compared on every rank with transformers' model of the family
(logits, and each local gradient shard against the sharded transformers gradient). The gathered logits of every
Mixtral layout are also compared with the single-process layout's.
"""
import glob
import json
import os

import pytest
import torch

LAYOUTS = {  # name: (world, TP, PP, EP, VP, MoE token dispatcher, expert TP (None: = TP))
    "tp2_sp": (2, 2, 1, 1, None, "alltoall", None),
    "pp2": (2, 1, 2, 1, None, "alltoall", None),
    "pp2_vp2": (2, 1, 2, 1, 2, "alltoall", None),
    "ep2_dp2_alltoall": (2, 1, 1, 2, None, "alltoall", None),
    "ep2_dp2_allgather": (2, 1, 1, 2, None, "allgather", None),
    "tp2_ep2_dp2_alltoall": (4, 2, 1, 2, None, "alltoall", None),
    "tp2_ep2_dp2_allgather": (4, 2, 1, 2, None, "allgather", None),
    "tp2_ep2_etp1_alltoall": (4, 2, 1, 2, None, "alltoall", 1),  # parallel folding: attention split, experts whole
    "tp2_ep2_etp1_allgather": (4, 2, 1, 2, None, "allgather", 1),
}
# Other families at TP2 x EP2 (sequence parallel, q/k norms and the shared expert's gate split by sequence), run in
# the launch of Mixtral's world-4 layouts with their own --hf-dir: compared with transformers.
FAMILY_LAYOUTS = {"qwen3_moe_tp2_ep2": ("tiny_qwen3_moe", (4, 2, 1, 2, None, "alltoall", None)),
                  "qwen2_moe_tp2_ep2": ("tiny_qwen2_moe", (4, 2, 1, 2, None, "alltoall", None))}
ARCHITECTURES = {"tiny_qwen3_moe": "Qwen3MoeForCausalLM", "tiny_qwen2_moe": "Qwen2MoeForCausalLM"}
LOGITS_TOL = 1e-5  # fp32, max abs
GRAD_REL_TOL = 1e-4  # fp32, max abs diff / max abs value of the reference tensor


def run_layouts(torchrun, hf_dir, out_dir, world, layouts: dict, hf_dirs: dict | None = None) -> dict[str, list[dict]]:
    """Every layout of `layouts` (name: (TP, PP, EP, VP, dispatcher, ETP)) in one launch of `world` processes, on
    `hf_dir` or the layout's own of `hf_dirs`; each layout's per-rank reports."""
    flags = {}
    for name, (tp, pp, ep, vp, dispatcher, etp) in layouts.items():
        flags[name] = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep), "--dispatcher", dispatcher]
        if name in (hf_dirs or {}):
            flags[name] += ["--hf-dir", hf_dirs[name]]
        if vp:
            flags[name] += ["--vp", str(vp)]
        if etp:
            flags[name] += ["--etp", str(etp)]
    torchrun("model_layouts.py", world, "--hf-dir", hf_dir, "--out", out_dir, "--layouts", json.dumps(flags))
    reports = {}
    for name in layouts:
        reports[name] = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out_dir, name, "rank*.json")))]
        assert len(reports[name]) == world
    return reports


def load_logits(out_dir) -> dict:
    logits = {}
    for path in glob.glob(os.path.join(out_dir, "logits_dp*.pt")):
        logits.update(torch.load(path))
    return logits


@pytest.fixture(scope="module")
def single_process_logits(torchrun, tiny_mixtral, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tp1"))
    reports = run_layouts(torchrun, tiny_mixtral, out, 1, {"tp1": (1, 1, 1, None, "alltoall", None)})["tp1"]
    assert reports[0]["logits_max_abs_diff"] <= LOGITS_TOL
    assert reports[0]["grad_max_rel_diff"] <= GRAD_REL_TOL, reports[0]
    return load_logits(os.path.join(out, "tp1"))


@pytest.fixture(scope="module")
def layout_outputs(torchrun, tiny_mixtral, request, tmp_path_factory):
    """(reports, output folder) of a layout; the layouts of one world size run in one launch, on first use."""
    runs = {}
    every = dict(LAYOUTS, **{name: layout for name, (_, layout) in FAMILY_LAYOUTS.items()})

    def get(name):
        world = every[name][0]
        if world not in runs:
            out = str(tmp_path_factory.mktemp(f"world{world}"))
            same_world = {n: layout[1:] for n, layout in every.items() if layout[0] == world}
            hf_dirs = {n: request.getfixturevalue(fixture) for n, (fixture, layout) in FAMILY_LAYOUTS.items()
                       if layout[0] == world}
            runs[world] = out, run_layouts(torchrun, tiny_mixtral, out, world, same_world, hf_dirs)
        out, reports = runs[world]
        return reports[name], os.path.join(out, name)

    return get


def test_single_process_matches_transformers(single_process_logits):
    assert sorted(single_process_logits) == [0, 1]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_and_transformers(name, layout_outputs, single_process_logits):
    reports, out = layout_outputs(name)
    etp = LAYOUTS[name][6]
    for report in reports:
        assert (f" ETP={etp} " in report["layout"]) == (etp is not None), report["layout"]  # really set up
        assert report["logits_max_abs_diff"] <= LOGITS_TOL, report
        assert report["grad_max_rel_diff"] <= GRAD_REL_TOL, report
        assert report["grads_checked"] > 0
    logits = load_logits(out)
    assert sorted(logits) == [0, 1]
    for index, value in logits.items():
        assert (value - single_process_logits[index]).abs().max().item() <= LOGITS_TOL


@pytest.mark.parametrize("name", list(FAMILY_LAYOUTS))
def test_other_family_matches_transformers(name, layout_outputs):
    reports, _ = layout_outputs(name)
    for report in reports:
        assert report["architecture"] == ARCHITECTURES[FAMILY_LAYOUTS[name][0]]
        assert report["logits_max_abs_diff"] <= LOGITS_TOL, report
        assert report["grad_max_rel_diff"] <= GRAD_REL_TOL, report
        assert report["grads_checked"] > 0
