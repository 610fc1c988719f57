"""Worker: run several `tools/convert_hf.py` command lines in one process and record each one's outcome.

    python tests/workers/convert_cli.py COMMANDS.json RESULTS.json

COMMANDS.json is a list of argv lists. Each runs through the tool's `main(argv)`, exactly what
`python tools/convert_hf.py ARGV...` runs, so the suite pays the Megatron import once rather than per command.
RESULTS.json gets, per command, its argv, exit code, stdout and stderr.
"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))

import convert_hf  # noqa: E402


def run(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = convert_hf.main(argv)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return {"argv": argv, "rc": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        commands = json.load(f)
    results = [run(argv) for argv in commands]
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
