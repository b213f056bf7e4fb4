"""Stop a real process at an exact point of the code under test, so a test can SIGKILL it there.

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
from collections.abc import Callable
from pathlib import Path
from types import FrameType
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
