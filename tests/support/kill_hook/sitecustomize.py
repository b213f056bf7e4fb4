"""A follower's run worker SIGKILLed mid-commit, for tests/e2e/test_follower_kill.py.

Python imports ``sitecustomize`` at start-up from the first folder of ``sys.path`` that has one; the
test puts this folder first on PYTHONPATH for `k2 run`, so every process it starts (webserver,
daemon, code server, the run workers the code server spawns) loads this file. It does nothing unless
K2_TEST_KILL_FOLLOWER_MARK names a marker file. Then, once ``k2_resources.sink.offset_commit`` is
imported, the process is killed with SIGKILL at the ``K2_TEST_KILL_FOLLOWER_AT``-th catalog commit
made by a range commit inside ``follow_topic`` (never a maintenance commit, never a run per range):
after its data files and the new metadata file are written, before the catalog points at that file
(the moment a commit is neither done nor undone). Catalog commits are counted, not range commits, so
a range committed in more than one catalog commit (offsets first, data after: a broken sink) can be
killed between them. The marker file, created before the kill with
O_EXCL, records the pid and the time; a process started after it exists is never killed, so the
follower that replaces the killed one runs normally. Nothing in the code under test is replaced:
each wrapper calls the original and only adds the kill.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from types import ModuleType

MARK = os.environ.get("K2_TEST_KILL_FOLLOWER_MARK", "")
TARGET = "k2_resources.sink.offset_commit"


def _inside(function_name: str) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _die() -> None:
    descriptor = os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "killed_at": time.time()}).encode())
    os.fsync(descriptor)
    os.close(descriptor)
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(module: ModuleType) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    kill_at = int(os.environ.get("K2_TEST_KILL_FOLLOWER_AT", "1"))
    state = threading.local()
    commits = {"n": 0}
    commit_once = module._commit_once
    write_metadata = SqlCatalog._write_metadata

    def counted_commit_once(*args, **kwargs):
        state.armed = _inside("follow_topic")
        try:
            return commit_once(*args, **kwargs)
        finally:
            state.armed = False

    def write_metadata_then_die(*args, **kwargs):
        write_metadata(*args, **kwargs)
        if getattr(state, "armed", False):
            commits["n"] += 1
            if commits["n"] == kill_at and not os.path.exists(MARK):
                _die()

    setattr(module, "_commit_once", counted_commit_once)  # noqa: B010 (the name is private to the module)
    SqlCatalog._write_metadata = staticmethod(write_metadata_then_die)  # type: ignore[method-assign]


class _ArmAfterImport(importlib.abc.MetaPathFinder):
    """Arms the kill right after the sink's commit module is imported (nothing is imported sooner)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_arm(module: ModuleType) -> None:
            exec_module(module)
            _arm(module)

        loader.exec_module = exec_then_arm
        return spec


if MARK and not os.path.exists(MARK):
    sys.meta_path.insert(0, _ArmAfterImport())
