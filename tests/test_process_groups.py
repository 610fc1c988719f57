"""Every process group the trainer and evaluator create gets the configured timeout, not only the world group."""
import json


def test_every_process_group_gets_the_configured_timeout(torchrun, tiny_mixtral, tmp_path):
    out = tmp_path / "timeouts.json"
    torchrun("process_group_timeouts.py", 2, "--hf-dir", tiny_mixtral, "--timeout-minutes", "7", "--out", str(out))
    timeouts = json.loads(out.read_text())
    # World, TP, PP, DP (and its gloo twin), EP, expert-DP (and its gloo twin), ...: Megatron-Core's own defaults
    # are 30 minutes, so a group left out would show 30.
    assert {"world", "_TENSOR_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP_GLOO", "_EXPERT_MODEL_PARALLEL_GROUP",
            "_EXPERT_DATA_PARALLEL_GROUP_GLOO"} <= set(timeouts)
    assert {name: minutes for name, minutes in timeouts.items() if minutes != 7} == {}
