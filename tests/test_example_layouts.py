"""The SLURM examples' default layouts are the ones the capacity planner ranks fastest on the script's node count.

Each script's defaults (#SBATCH --nodes, TP/PP/EP, recompute, optimizer offload) are read from the script itself
and compared with the first layout `tools/estimate_memory.py --search --nodes N` prints for the recipe's batch, so a
change of the estimator that moves the best layout, or an edit of a script's defaults, fails here until both agree.
"""
import contextlib
import io
import os
import re

import pytest

from orpo_megatron.planning import estimator as estimate_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_defaults(*names: str) -> dict[str, str]:
    """`NAME=${NAME:-value}` / `${NAME-value}` defaults and `#SBATCH --nodes`, the first script naming each wins."""
    found: dict[str, str] = {}
    for name in names:
        text = open(os.path.join(REPO, "examples", name)).read()
        for key, value in re.findall(r"\b([A-Z_]+)=\$\{\1:?-([^}]*)\}", text):
            found.setdefault(key, value)
        found.setdefault("NODES", re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    return found


@pytest.mark.parametrize("config, scripts", [
    ("mixtral-8x22b.json", ["orpo_mixtral_8x22b.sh"]),
    ("mixtral-8x7b.json", ["orpo_mixtral_8x7b.sh", "orpo_mixtral_8x22b.sh"]),  # 8x7B sets its own, execs 8x22B
])
def test_example_defaults_are_the_fastest_layout_on_their_nodes(config, scripts):
    defaults = script_defaults(*scripts)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = estimate_memory.main([
            "--hf-config", os.path.join(REPO, "tools", "configs", config), "--search", "--nodes", defaults["NODES"],
            "--max-length", defaults["MAX_LENGTH"], "--micro-batch-size", defaults["MICRO_BATCH"],
            "--global-batch-size", defaults["GLOBAL_BATCH"]])
    assert code == 0
    report = printed.getvalue().split("\nfastest:")[1]
    layout = re.search(r"^layout: TP(\d+) PP(\d+) EP(\d+) ETP\d+ DP\d+ .*; (full recompute|no recompute); "
                       r"optimizer: (.*)$", report, re.M)
    assert layout, report[:2000]
    tp, pp, ep, recompute, optimizer = layout.groups()
    assert (tp, pp, ep) == (defaults["TP"], defaults["PP"], defaults["EP"])
    assert recompute == ("full recompute" if defaults["RECOMPUTE"] == "full" else "no recompute")
    offload = float(defaults["OPTIMIZER_OFFLOAD"])
    if offload:
        assert optimizer.startswith(f"offload {offload:g} to the host"), optimizer
    else:
        assert not optimizer.startswith("offload"), optimizer
