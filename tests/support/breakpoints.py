"""Stop a real process at an exact point of the code under test, so a test can SIGKILL it there,
or hold several processes there until all have arrived (a barrier that forces a race).

Like a debugger's breakpoint: nothing in the code under test is replaced or told about tests. The
process installs a profile hook (``sys.setprofile``) that watches for one function being entered;
when it is, the hook writes a barrier file (the process's pid) and blocks for good. The test waits
for the barrier file, checks what the process did up to that point, and kills it with SIGKILL:
the process dies exactly before the first line of that function, as a crash there would leave it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any


def stop_on_entry(function: Callable[..., Any], barrier: Path) -> None:
    """In this thread, from now on: the first call of ``function`` writes ``barrier`` and blocks forever."""
    code = function.__code__

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            sys.setprofile(None)
            barrier.write_text(str(os.getpid()))
            threading.Event().wait()  # stopped here until the test kills the process

    sys.setprofile(profile)


def nested_code(function: Callable[..., Any], name: str) -> CodeType:
    """The code of the function ``name`` defined inside ``function`` (a closure's code is shared by
    every function object made from it)."""
    for constant in function.__code__.co_consts:
        if isinstance(constant, CodeType) and constant.co_name == name:
            return constant
    raise LookupError(f"{function.__qualname__} defines no function {name!r}")


def meet_on_entry(code: CodeType, folder: Path, parties: int, timeout_s: float = 120.0) -> None:
    """In this thread, from now on: the first call of the function whose code is ``code`` waits until
    ``parties`` processes (this one included) have reached it, then goes on; each process announces
    itself by a file in ``folder``. A cross-process barrier, e.g. so that every writer has loaded the
    table before any of them commits. After ``timeout_s`` it goes on anyway, leaving a file
    ``<pid>.late`` so the test finds that the processes did not meet (:func:`met`)."""

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            sys.setprofile(None)
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + timeout_s
            while len(_arrived(folder)) < parties:
                if time.monotonic() > deadline:
                    (folder / f"{os.getpid()}.late").touch()
                    return
                time.sleep(0.005)

    sys.setprofile(profile)


def _arrived(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.suffix != ".late"]


def met(folder: Path, parties: int) -> bool:
    """True when ``parties`` processes reached the barrier in ``folder`` and none went on alone."""
    return len(_arrived(folder)) == parties and not list(folder.glob("*.late"))
