"""`k2 query` only reads: its handlers run with the object store's reader identity, and the writer's
secret is gone from the process before any query starts."""

from __future__ import annotations

import argparse
import os

import pytest

from k2_assets.cli import query


def test_k2_query_handlers_hold_the_reader_identity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_S3_ACCESS_KEY_ID", "writer")
    monkeypatch.setenv("K2_S3_SECRET_ACCESS_KEY", "writer-secret")
    monkeypatch.setenv("K2_ICEBERG_CATALOG_CREDENTIAL", "writer:writer-secret")
    monkeypatch.setenv("K2_S3_READER_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("K2_S3_READER_SECRET_ACCESS_KEY", "reader-secret")
    monkeypatch.setenv("K2_ICEBERG_READER_CREDENTIAL", "reader:reader-secret")
    seen: dict[str, str | None] = {}

    def handler(args: argparse.Namespace) -> int:
        seen.update({name: os.environ.get(name) for name in ("K2_S3_ACCESS_KEY_ID", "K2_S3_SECRET_ACCESS_KEY")})
        seen["credential"] = os.environ.get("K2_ICEBERG_CATALOG_CREDENTIAL")
        return 0

    parser = argparse.ArgumentParser()
    query.register(parser.add_subparsers(dest="command"))
    for kind in ("sql", "trades", "ohlcv"):
        wrapped = parser.parse_args(["query", kind, *(["select 1"] if kind == "sql" else ["--symbol", "BHP"])])
        assert wrapped.handler.__qualname__.startswith("_as_reader"), kind
    assert query._as_reader(handler)(argparse.Namespace()) == 0
    assert seen == {
        "K2_S3_ACCESS_KEY_ID": "reader",
        "K2_S3_SECRET_ACCESS_KEY": "reader-secret",
        "credential": "reader:reader-secret",
    }
    assert "writer-secret" not in "".join(os.environ.values())
