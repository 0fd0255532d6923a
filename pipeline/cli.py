"""The one error boundary every `python -m pipeline.*` entry point runs under.

`run(main, interrupted=...)` calls `main()` and turns what escapes it into ONE line on stderr and
a non-zero exit status, so every entry point behaves alike:

* a known error (bad params, malformed COCO, a damaged or mismatched store, an unreadable
  checkpoint, a full disk, a run folder from other params, ...) -> ``error: <message>``, exit 1;
  the messages name the file / field and the fix (they are written where the error is found);
* any other exception (a bug) -> ``error: internal error (<Type>: <message>) ...`` plus the hint
  to rerun with the traceback, exit 1;
* Ctrl-C -> ``interrupted: <what was kept>``, exit 130.

`--debug` on the command line, or KDCACHE_DEBUG=1 in the environment, re-raises instead, so the
full traceback is printed. SystemExit (argparse, `--help`, explicit exits) passes through.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from stages.config import ConfigError
from stores.base import StoreError

DEBUG_ENV = "KDCACHE_DEBUG"
# errors whose message is written for the user: the file / field and the fix
KNOWN = (ConfigError, StoreError, ValueError, OSError, KeyError, FloatingPointError, EOFError, MemoryError)


def debug_enabled(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (KeyError's repr quotes are dropped)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


def run(main: Callable[[], object], interrupted: str = "nothing was written", argv: list[str] | None = None) -> None:
    """Run an entry point's `main` under the boundary (see the module docstring)."""
    # torch warns about the pickle protocol of any foreign file it is asked to read with
    # weights_only=True, right before our one-line refusal of it: noise, not information
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    if debug_enabled(argv):
        main()
        return
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted: {interrupted}\n")
        sys.exit(130)
    except SystemExit as stop:  # an entry point's own "error: ..." exit: kept, on one line
        if isinstance(stop.code, str):
            sys.exit(" ".join(stop.code.split()))
        raise
    except KNOWN as err:
        if isinstance(err, KeyError) and " " not in one_line(err):  # a bare key: a bug, not a message
            _internal(err)
        if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err):
            sys.exit(f"error: {err.filename}: {one_line(err)}")
        sys.exit(f"error: {one_line(err)}")
    except Exception as err:  # a bug: still one line, with the way to the traceback
        if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: a setting, not a bug
            sys.exit(f"error: out of device memory ({one_line(err)[:200]}); lower train.batch_size / "
                     "cache.batch_size or the image sizes")
        _internal(err)


def _internal(err: BaseException) -> None:
    sys.exit(f"error: internal error ({type(err).__name__}: {one_line(err)[:300]}); rerun with --debug "
             f"(or {DEBUG_ENV}=1) for the traceback and report it")
