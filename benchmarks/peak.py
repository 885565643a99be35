"""Run a Python module as ``python -m`` would, then write this process's peak RSS (bytes) to a file.

    python benchmarks/peak.py OUT.json -m fedsilo aggregator --config settings.yaml
    python benchmarks/peak.py OUT.json -c "import fedsilo.aggregator"   # a baseline

``ru_maxrss`` of the process itself is exact, where sampling /proc from outside can miss a
short peak; the file is written however the module exits (Typer always raises SystemExit).
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    out, mode, target, *rest = sys.argv[1:]
    started = time.perf_counter()
    try:
        if mode == "-m":
            sys.path[0] = os.getcwd()  # as ``python -m`` does: the working directory comes first
            sys.argv = [target, *rest]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif mode == "-c":
            sys.argv = ["-c", *rest]
            exec(compile(target, "<peak -c>", "exec"), {"__name__": "__main__"})  # noqa: S102 (as python -c)
        else:
            raise SystemExit(f"usage: peak.py OUT -m MODULE [ARGS...] | -c CODE; got {mode!r}")
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "peak_rss_bytes": usage.ru_maxrss * 1024,
                    "seconds": time.perf_counter() - started,
                    "cpu_seconds": usage.ru_utime + usage.ru_stime,
                },
                handle,
            )


if __name__ == "__main__":
    main()
