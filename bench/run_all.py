"""Every benchmark in order, sharing one scratch folder (dataset, teacher, caches): `make bench`.

    python -m bench.run_all [--scale small|real] [--rounds N] [--images N] [...]

Options are those of each benchmark (`python -m bench.cache_throughput --help`) and are passed to
all of them. `bench.views` (two student trainings per seed) is not run here: `python -m bench.views`. Writes bench/results/<name>.json (or <name>-real.json) and SUMMARY.md.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time

from bench.common import make_parser
from bench.summary import BENCHMARKS

# bench.views trains two students per seed (tens of minutes on a CPU): run it on its own
SLOW = ("views",)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser("run_all", __doc__).parse_args(argv)  # validate once, before any work
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        if not args.workdir:
            argv += ["--workdir", tmp]
        for name in (n for n in BENCHMARKS if n not in SLOW):
            t1 = time.perf_counter()
            print(f"\n=== bench.{name} ===", flush=True)
            importlib.import_module(f"bench.{name}").main(argv)
            print(f"=== bench.{name}: {time.perf_counter() - t1:.0f} s ===", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s; summary in {args.out}/SUMMARY.md")


if __name__ == "__main__":
    main()
