"""User mistakes end every command line with one `error: ...` line that names the file, row or flag and what was
expected, a non-zero exit and no traceback, before work is lost; and no file that existed before is changed.

One table: each case writes its bad input into its own folder, runs one command line (in-process where the
mistake is found before any process group starts; the data-layer cases call the function the trainer and the
evaluator call and print what their `cli()` prints), and checks the exit code, the message and that every file
that was there before is still there with the same bytes (caches aside).
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import trainer_signal_handlers_undone
from orpo_megatron import evaluate, train
from orpo_megatron.data.arguments import DataConfig
from orpo_megatron.data.pipeline import make_pair_tokenizer, tokenized_split
from orpo_megatron.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = os.path.join(REPO, "examples", "data", "plain.jsonl")
CAPYBARA = os.path.join(REPO, "examples", "data", "capybara_style.jsonl")
CACHE = "cache"  # every case's caches (tokenized data, datasets' builds) live here, outside the comparison


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code(call, argv) -> int:
    try:
        code = call(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code or 0


def _data_layer(argv: list[str]) -> int:
    """What the trainer and the evaluator do with the data flags, reported as their cli() reports it."""
    flags = dict(zip(argv[::2], argv[1::2]))
    config = DataConfig(data_path=flags["--data-path"], cache_dir=flags["--data-cache-dir"],
                        on_bad_row=flags.get("--on-bad-row", "skip"))
    try:
        _, stats = tokenized_split(config, make_pair_tokenizer(config, flags["--tokenizer"]), "train")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0


def _train_in_process(argv: list[str]) -> int:
    """train.cli, giving pytest back the SIGTERM / SIGUSR1 handlers the trainer installs."""
    with trainer_signal_handlers_undone():
        return _exit_code(train.cli, argv)


def _subprocess_train(argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-m", "orpo_megatron.train", *argv], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


COMMANDS = {
    "inspect_data": lambda argv: _exit_code(_tool("inspect_data").main, argv),
    "data": _data_layer,
    "convert_hf": lambda argv: _exit_code(_tool("convert_hf").main, argv),
    "plot_metrics": lambda argv: _exit_code(_tool("plot_metrics").main, argv),
    "estimate_memory": lambda argv: _exit_code(_tool("estimate_memory").main, argv),
    "evaluate": lambda argv: _exit_code(evaluate.cli, argv),
    "train": _train_in_process,
    "train (process)": _subprocess_train,
}


# ------------------------------------------------------------------------------------------ writing bad input
def _lines(path: str, count: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.readlines()[:count]


def _write(path: str, content: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def _truncate(path: str, keep: float = 0.5) -> None:
    os.truncate(path, int(os.path.getsize(path) * keep))


def _checkpoint(fixtures, root: str, damaged: str | None = None) -> str:
    """A copy of the converted tiny Mixtral, with one file of its release folder cut to half."""
    ckpt = shutil.copytree(fixtures["converted"], os.path.join(root, "ckpt"))
    if damaged:
        _truncate(os.path.join(ckpt, "release", damaged))
    return ckpt


def empty_jsonl(root, fixtures):
    data = _write(os.path.join(root, "rows.jsonl"), "\n  \n")
    return "evaluate", ["--load", fixtures["converted"], "--data-path", data, "--output",
                        os.path.join(root, "scores.jsonl")], 1, [f"error: --data-path {data} is empty; expected"]


def missing_data_path(root, fixtures):
    data = os.path.join(root, "missing.jsonl")
    return "train", ["--load", fixtures["converted"], "--data-path", data], 1, [
        f"error: --data-path {data}: no such file or folder"]


def missing_column(root, fixtures):
    rows = [json.loads(line) for line in _lines(PLAIN, 5)]
    data = _write(os.path.join(root, "rows.jsonl"),
                  "".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows))
    return "inspect_data", ["--data-path", data, "--tokenizer", fixtures["hf"]], 1, [
        f"error: {data} [train]: expected columns prompt/chosen/rejected", "found ['prompt', 'chosen']"]


def trailing_partial_line(root, fixtures):
    lines = _lines(PLAIN, 6)
    data = _write(os.path.join(root, "rows.jsonl"), "".join(lines[:5]) + lines[5][:40])
    return "data", ["--data-path", data, "--tokenizer", fixtures["hf"], "--on-bad-row", "error"], 1, [
        f"error: {data} [train]: row 5 is bad (unreadable: line 6 of {data} is not valid JSON",
        "expected one JSON object per line", "--on-bad-row skip"]


def non_utf8_row_named(root, fixtures):
    lines = _lines(PLAIN, 10)
    bad = lines[3][:20].encode() + b"\xff" + lines[3][20:].encode()  # a lone 0xff byte inside the prompt text
    data = _write(os.path.join(root, "rows.jsonl"), "".join(lines[:3]).encode() + bad + "".join(lines[4:]).encode())
    return "data", ["--data-path", data, "--tokenizer", fixtures["hf"], "--on-bad-row", "error"], 1, [
        f"row 3 is bad (unreadable: line 4 of {data} is not UTF-8 text (byte 0xff at column 21)"]


def non_utf8_row_skipped(root, fixtures):
    lines = _lines(PLAIN, 30)
    data = _write(os.path.join(root, "rows.jsonl"), "".join(lines).encode() + b'{"prompt": "\xfe"}\n')
    return "data", ["--data-path", data, "--tokenizer", fixtures["hf"]], 0, [
        f"{data} [train]: 30 pairs from 31 rows; bad rows skipped: unreadable 1"]


def rewritten_with_mtime_kept(root, fixtures):
    data = _write(os.path.join(root, "rows.jsonl"), "".join(_lines(PLAIN, 40)))
    os.utime(data, (1_700_000_000, 1_700_000_000))
    assert COMMANDS["inspect_data"](["--data-path", data, "--tokenizer", fixtures["hf"],
                                     "--data-cache-dir", os.path.join(root, CACHE)]) == 0  # 40 rows cached
    _write(data, "".join(_lines(PLAIN, 20)))
    os.utime(data, (1_700_000_000, 1_700_000_000))  # cp -p, rsync -t
    return "inspect_data", ["--data-path", data, "--tokenizer", fixtures["hf"]], 0, [
        f"{data} [train]: 20 rows, 20 pairs kept"]


def truncated_shard_on_export(root, fixtures):
    ckpt = _checkpoint(fixtures, root, "__0_0.distcp")
    shard = os.path.join(ckpt, "release", "__0_0.distcp")
    written = os.path.getsize(os.path.join(fixtures["converted"], "release", "__0_0.distcp"))
    return "convert_hf", ["megatron-to-hf", "--load", ckpt, "--output", os.path.join(root, "hf")], 2, [
        f"error: {shard} is truncated: {os.path.getsize(shard)} bytes; the checkpoint's .metadata indexes {written}"]


def truncated_metadata_on_evaluate(root, fixtures):
    ckpt = _checkpoint(fixtures, root, ".metadata")
    return "evaluate", ["--load", ckpt, "--data-path", PLAIN, "--output", os.path.join(root, "scores.jsonl")], 1, [
        f"error: {ckpt}/release/.metadata cannot be read (UnpicklingError", "truncated or damaged"]


def truncated_common_pt_on_load(root, fixtures):
    ckpt = _checkpoint(fixtures, root, "common.pt")
    return "train", ["--load", ckpt, "--data-path", PLAIN], 1, [
        f"error: {ckpt}/release/common.pt cannot be read", "truncated or damaged"]


def truncated_newest_iteration_on_resume(root, fixtures):
    save = os.path.join(root, "save")
    for iteration in (1, 2):
        shutil.copytree(os.path.join(fixtures["converted"], "release"), os.path.join(save, f"iter_000000{iteration}"))
    _write(os.path.join(save, "latest_checkpointed_iteration.txt"), "2")
    _truncate(os.path.join(save, "iter_0000002", "__0_0.distcp"), 0.01)
    return "train", ["--load", fixtures["converted"], "--save", save, "--data-path", PLAIN], 1, [
        f"error: {save}/iter_0000002/__0_0.distcp is truncated",
        f"The newest complete older checkpoint is {save}/iter_0000001: to resume from it, write 1 into "
        f"{save}/latest_checkpointed_iteration.txt"]


def truncated_safetensors(root, fixtures):
    hf = shutil.copytree(fixtures["hf"], os.path.join(root, "hf"))
    _truncate(os.path.join(hf, "model.safetensors"))
    return "convert_hf", ["hf-to-megatron", "--hf-dir", hf, "--output", os.path.join(root, "out")], 2, [
        f"error: {hf}/model.safetensors: cannot be read as safetensors", "truncated"]


def export_over_the_folder_holding_its_input(root, fixtures):
    ckpt = _checkpoint(fixtures, root)
    _write(os.path.join(root, "notes.txt"), "the user's")
    return "convert_hf", ["megatron-to-hf", "--load", ckpt, "--output", root, "--overwrite"], 2, [
        f"error: --output {root} overlaps the input {ckpt}"]


def import_into_its_own_input(root, fixtures):
    hf = shutil.copytree(fixtures["hf"], os.path.join(root, "hf"))
    return "convert_hf", ["hf-to-megatron", "--hf-dir", hf, "--output", os.path.join(hf, "megatron"),
                          "--overwrite"], 2, [f"error: --output {hf}/megatron overlaps the input {hf}"]


def overwrite_of_a_folder_with_other_files(root, fixtures):
    ckpt = _checkpoint(fixtures, root)
    out = os.path.join(root, "out")
    os.makedirs(out)
    _write(os.path.join(out, "config.json"), "{}")
    _write(os.path.join(out, "notes.txt"), "the user's")
    return "convert_hf", ["megatron-to-hf", "--load", ckpt, "--output", out, "--overwrite"], 2, [
        f"error: --output {out} holds notes.txt, which this command does not write"]


def metrics_cut_off_by_a_kill(root, fixtures):
    run = os.path.join(root, "run")
    os.makedirs(run)
    _write(os.path.join(run, "metrics.jsonl"), '{"iteration": 1, "train/loss": 1.0}\n'
                                               '{"iteration": 2, "train/loss": 0.9}\n{"iteration": 3, "tra')
    return "plot_metrics", [run, "--output", os.path.join(root, "curves.png")], 0, [
        f"warning: {run}/metrics.jsonl:3: skipped the incomplete last line", "2 events"]


def non_utf8_model_config(root, fixtures):
    config = _write(os.path.join(root, "config.json"),
                    open(os.path.join(fixtures["hf"], "config.json"), "rb").read() + b"\xff")
    return "estimate_memory", ["--hf-config", config], 2, [f"error: {config}: not valid JSON", "can't decode byte 0xff"]


def resume_on_other_pairs_of_the_same_count(root, fixtures):
    save = shutil.copytree(fixtures["trained"], os.path.join(root, "save"))
    rows = [json.loads(line) for line in _lines(CAPYBARA, 300)]
    rows[7] = dict(rows[7], chosen=rows[7]["rejected"], rejected=rows[7]["chosen"])  # an edited row, same count
    data = _write(os.path.join(root, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return "train (process)", [
        "--load", fixtures["converted"], "--save", save, "--data-path", data, "--max-length", "64",
        "--max-prompt-length", "48", "--global-batch-size", "4", "--train-iters", "2"], 1, [
        "error: cannot resume: the 300 training pairs differ from those the checkpoint was trained on",
        "pass --allow-data-change"]


CASES = [empty_jsonl, missing_data_path, missing_column, trailing_partial_line, non_utf8_row_named,
         non_utf8_row_skipped, rewritten_with_mtime_kept, truncated_shard_on_export, truncated_metadata_on_evaluate,
         truncated_common_pt_on_load, truncated_newest_iteration_on_resume, truncated_safetensors,
         export_over_the_folder_holding_its_input, import_into_its_own_input, overwrite_of_a_folder_with_other_files,
         metrics_cut_off_by_a_kill, non_utf8_model_config, resume_on_other_pairs_of_the_same_count]


def _files(root: str) -> dict[str, str]:
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != os.path.join(root, CACHE)]
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def fixtures(request, tiny_mixtral, tiny_converted):
    found = {"hf": tiny_mixtral, "converted": tiny_converted}
    if "same_count" in request.node.name:  # the only case that needs a trained checkpoint (a torchrun fixture)
        found["trained"] = request.getfixturevalue("trained_tp2_pp2")
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_user_mistake_is_one_line_naming_it_and_loses_nothing(case, fixtures, tmp_path):
    root = str(tmp_path)
    command, argv, expected_code, fragments = case(root, fixtures)
    if command in ("inspect_data", "data", "train (process)"):
        argv = [*argv, "--data-cache-dir", os.path.join(root, CACHE)]
    before = _files(root)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = COMMANDS[command](argv)
    out, err = stdout.getvalue(), stderr.getvalue()
    assert code == expected_code, (out[-3000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in (err if expected_code else out + err), (fragment, out[-2000:], err[-3000:])
    if expected_code:  # one line says it all
        assert sum("error:" in line for line in err.splitlines()) == 1, err[-3000:]
    after = _files(root)
    lost = {name for name, digest in before.items() if after.get(name) != digest}
    assert not lost, f"changed or removed: {sorted(lost)}"
