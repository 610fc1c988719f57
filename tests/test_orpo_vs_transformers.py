"""Loss, every TRL metric and the per-pair values of our model on a fixed batch, padded and packed, equal
transformers' model + TRL's formulas, for ORPO and each CPO-family loss: Mixtral at TP1, TP2xEP2 and PP2, Qwen3-MoE
at TP1."""
import json

import pytest

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]
RELATIVE_TOL = 1e-5  # fp32


@pytest.mark.parametrize("model, nproc, flags", [
    ("mixtral", 1, []),
    ("mixtral", 4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    ("mixtral", 2, ["--pipeline-model-parallel-size", "2"]),
    ("qwen3_moe", 1, []),
], ids=["tp1", "tp2_ep2", "pp2", "qwen3_moe_tp1"])
def test_loss_and_metrics_match_transformers_and_trl(model, nproc, flags, torchrun, request, tmp_path):
    hf_dir = request.getfixturevalue(f"tiny_{model}")
    load = request.getfixturevalue("tiny_converted" if model == "mixtral" else f"tiny_{model}_converted")
    out = tmp_path / "report.json"
    torchrun("orpo_vs_transformers.py", nproc, "--load", load, "--hf-dir", hf_dir, "--out", str(out),
             "--data-path", "examples/data/capybara_style.jsonl", "--max-length", "256", "--max-prompt-length", "192",
             *flags)
    report = json.loads(out.read_text())
    check_against_trl(report, report, METRICS)
    if "--pipeline-model-parallel-size" in flags:  # the trainer's fixed-length packed rows: a padding tail
        assert report["packed_row"]["positions"] > report["packed_row"]["real_tokens"], report["packed_row"]
    reference = report["reference"]
    # The fixed batch is not degenerate: the two completions of a pair really differ in log-probability.
    assert reference["logps/chosen"] != reference["logps/rejected"]
    # TRL's CPO family (every loss type, from the same run's model): CPOTrainer logs no log_odds_* metrics.
    assert sorted(report["cpo"]) == ["hinge", "ipo", "sigmoid", "simpo", "simpo_nll"]
    for cpo in report["cpo"].values():
        check_against_trl(cpo, report, METRICS[:-2])


def check_against_trl(ours_and_reference: dict, report: dict, metrics: list[str]) -> None:
    for layout in ("ours", "ours_packed"):
        ours = ours_and_reference[layout]
        assert sorted(ours) == sorted(metrics)
        for name in metrics:
            # TRL masks padding keys in attention and we do not; that changes only padding positions' logits, which
            # only `logits/*` average (TRL includes padding positions there), so those compare with the causal
            # forward. A packed row has no padding positions between sequences: there `logits/*` averages the
            # positions that have a next token of their own sequence.
            if name.startswith("logits/") and layout == "ours":
                reference = ours_and_reference["reference_causal_only"]
            elif name.startswith("logits/"):
                reference = report["reference_real_positions"]
            else:
                reference = ours_and_reference["reference"]
            scale = max(abs(reference[name]), 1e-3)
            assert abs(ours[name] - reference[name]) <= RELATIVE_TOL * scale, (layout, name, ours[name],
                                                                                reference[name])
        # Per pair: sequence log-probs (a pair's rewards are beta times them on both sides), the pair term of the
        # loss, the chosen NLL, and ORPO's log odds.
        ours, reference = ours_and_reference[f"{layout}_pairs"], ours_and_reference["reference_pairs"]
        assert sorted(ours) == sorted(reference)
        for name, values in reference.items():
            for pair, (value, expected) in enumerate(zip(ours[name], values, strict=True)):
                scale = max(abs(expected), 1e-3)
                if name == "log_odds":  # about chosen - rejected log-prob: fp32 rounds each relative to itself
                    scale = max(scale, abs(reference["chosen_logps"][pair]), abs(reference["rejected_logps"][pair]))
                assert abs(value - expected) <= RELATIVE_TOL * scale, (layout, name, pair, value, expected)
