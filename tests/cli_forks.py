"""Run many command lines as forks of one process that has already imported torch.

    python tests/cli_forks.py < cases.json > results.json

cases: [{"argv": ["generate.py", "--checkpoint", ...], "cwd": ROOT, "timeout": 300}, ...];
results: [{"returncode", "stdout", "stderr"}, ...] in the same order.

tests/test_cli.py runs 79 bad command lines; as separate `python script.py` processes
each pays the ~3-5 s import of torch before it gets to its one error line. Here the import is
paid once and every case is a fork() that then runs the script as `python script.py` would
(runpy as __main__, sys.argv, sys.path[0] = the script's folder, the cwd, stdin from /dev/null,
its own stdout / stderr files, its exit status), so the child still starts from a process that
has run nothing of ours. Only third-party modules are imported before the fork, with warnings
recorded and then forgotten, so that a warning a script triggers is still printed by it.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
import warnings


def _preimport() -> None:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        import accelerate  # noqa: F401
        import safetensors.torch  # noqa: F401
        import sentencepiece  # noqa: F401
        import torch  # noqa: F401


def _child(argv: list[str], cwd: str, out: int, err: int) -> None:
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(cwd)
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter maps sys.exit's argument to a status
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # an uncaught exception: a traceback and status 1, as python prints it
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_case(argv: list[str], cwd: str, timeout: float) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(argv, cwd, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = "timeout"
                break
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": code,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def main() -> None:
    cases = json.load(sys.stdin)
    _preimport()
    results = [run_case(c["argv"], c["cwd"], c.get("timeout", 300)) for c in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
