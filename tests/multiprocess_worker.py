"""One process of tests/test_multiprocess.py: `clara-jax ARGS…`, recording what it wrote.

A Python audit hook notes every path under $MP_WATCH that this process opens for writing,
creates or renames, and the list is saved to $MP_WRITES at exit, so the test can check that
only process 0 writes metrics, plots and the model directory (writes done in C++, such as
orbax's array files, are not seen; the checks only concern files written from Python).

    python -m tests.multiprocess_worker train --config … --coordinator localhost:PORT …
"""

from __future__ import annotations

import json
import os
import sys


def _watch(root: str, seen: set) -> None:
    root = os.path.abspath(root) + os.sep

    def hook(event, args):
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1] or "r", args[2] or 0
            writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            paths = [args[0]] if writing else []
        elif event in ("os.mkdir", "os.rename", "os.remove"):
            paths = [args[1] if event == "os.rename" else args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            path = os.path.abspath(os.fspath(path)) if not isinstance(path, int) else ""
            if path.startswith(root):
                seen.add(path[len(root) :])

    sys.addaudithook(hook)


def main() -> int:
    seen: set = set()
    watch, report = os.environ.get("MP_WATCH"), os.environ.get("MP_WRITES")
    if watch:
        _watch(watch, seen)
    from clara_jax.cli import main as cli_main

    try:
        return cli_main(sys.argv[1:])
    finally:
        if report:
            with open(report, "w") as f:
                json.dump(sorted(seen), f)


if __name__ == "__main__":
    sys.exit(main())
