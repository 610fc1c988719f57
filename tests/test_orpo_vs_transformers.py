"""Loss and every TRL metric of our model on a fixed batch, padded and packed, equal transformers' Mixtral + TRL's
formulas."""
import json

import pytest

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]
RELATIVE_TOL = 1e-5  # fp32


@pytest.mark.parametrize("nproc, flags", [
    (1, []),
    (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
], ids=["tp1", "tp2_ep2"])
def test_loss_and_metrics_match_transformers_and_trl(nproc, flags, torchrun, tiny_mixtral, tiny_converted, tmp_path):
    out = tmp_path / "report.json"
    torchrun("orpo_vs_transformers.py", nproc, "--load", tiny_converted, "--hf-dir", tiny_mixtral, "--out", str(out),
             "--data-path", "examples/data/capybara_style.jsonl", "--max-length", "256", "--max-prompt-length", "192",
             *flags)
    report = json.loads(out.read_text())
    for layout in ("ours", "ours_packed"):
        ours = report[layout]
        assert sorted(ours) == sorted(METRICS)
        for name in METRICS:
            # TRL masks padding keys in attention and we do not; that changes only padding positions' logits, which
            # only `logits/*` average (TRL includes padding positions there), so those compare with the causal
            # forward. A packed row has no padding positions between sequences: there `logits/*` averages the
            # positions that have a next token of their own sequence.
            if name.startswith("logits/"):
                reference = report["reference_causal_only" if layout == "ours" else "reference_real_positions"]
            else:
                reference = report["reference"]
            scale = max(abs(reference[name]), 1e-3)
            assert abs(ours[name] - reference[name]) <= RELATIVE_TOL * scale, (layout, name, ours[name],
                                                                                reference[name])
    reference = report["reference"]
    # The fixed batch is not degenerate: the two completions of a pair really differ in log-probability.
    assert reference["logps/chosen"] != reference["logps/rejected"]
