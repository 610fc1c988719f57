"""The trainer's optimizer step on CPU equals torch's reference AdamW with Megatron's gradient clipping.

On CPU the step takes shortcuts (the CPU backend skips data-parallel collectives over one process and clips in
place; `optimizer.py` switches torch's AdamW to its fused kernel). Two steps at world size 1 (the shortcuts) and
DP2 (real collectives), fp32 and bf16, against `torch.optim.AdamW` in its loop form on fp32 copies, fed the
DP-averaged gradients clipped by hand (`tests/workers/optimizer_step.py`).
"""
import json

import pytest

# fp32: the fused kernel rounds differently from the loop (a few ulps of fp32). bf16: the parameters are the
# fp32 main parameters rounded to bf16, so one bf16 ulp (2**-8 relative) where rounding falls the other way.
PARAM_TOLERANCE = {"fp32": 1e-5, "bf16": 2 ** -7}
NORM_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}  # relative; bf16 gradients are summed in fp32 buffers


@pytest.mark.parametrize("world", [1, 2])
def test_optimizer_step_equals_reference_adamw_with_clipping(tiny_mixtral, torchrun, tmp_path, world):
    torchrun("optimizer_step.py", world, "--hf-dir", tiny_mixtral, "--out", str(tmp_path))
    results = [result for rank in range(world) for result in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert sorted(r["layout"] for r in results) == sorted(["fp32", "bf16"] * world)
    for result in results:
        precision = result["layout"]
        assert result["fused_groups"] and all(result["fused_groups"]), "torch's fused AdamW kernel is not used"
        for step, record in enumerate(result["steps"], start=1):
            where = f"{precision} world {world} step {step}"
            assert record["applied"], where
            assert record["reference_norm"] > 2, f"{where}: the gradients are not large enough to be clipped"
            assert record["grad_norm"] == pytest.approx(record["reference_norm"], rel=NORM_TOLERANCE[precision]), where
            assert record["param_max_rel_error"] <= PARAM_TOLERANCE[precision], where
            # The comparison can tell a step that skipped clipping.
            assert record["param_max_rel_error_vs_unclipped"] > 10 * PARAM_TOLERANCE[precision], where
