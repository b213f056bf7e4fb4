"""`k2 api`: serve the HTTP query API with uvicorn on 127.0.0.1 (port K2_API_PORT, default 8000), over
HTTPS when K2_API_TLS_CERT and K2_API_TLS_KEY name a PEM certificate and key;
`k2 api keys create|list|revoke` manages its API keys (stored hashed; a new key is printed once).

The API only reads tables: when the environment names the object store's reader identity
(K2_S3_READER_*, written by `k2 cluster`), the process takes it and drops the writer's secret."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from k2_resources.api.app import DEFAULT_API_PORT, ApiSettings
from k2_resources.api.keys import SCOPES, KeyFile, KeyStore, default_keys_file
from k2_resources.api.tokens import TokenSettings
from k2_resources.catalog.settings import use_reader_identity
from k2_resources.errors import K2Error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("api", help="serve the HTTP query API on 127.0.0.1 (and manage its API keys)")
    parser.add_argument(
        "--host",
        default=os.environ.get("K2_API_HOST", "127.0.0.1"),
        help="address to bind (default 127.0.0.1, K2_API_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("K2_API_PORT", DEFAULT_API_PORT)),
        help=f"port (default {DEFAULT_API_PORT}, K2_API_PORT)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("K2_API_WORKERS", 1)),
        help="uvicorn worker processes (default 1, K2_API_WORKERS); rate limits are per worker",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    parser.set_defaults(handler=_serve)
    commands = parser.add_subparsers(dest="api_command")

    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    keys.add_argument("--file", default=None, help="keys file (default $K2_API_KEYS_FILE or K2_HOME/api/keys.json)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (once: only its hash is stored)")
    create.add_argument("--name", required=True, help="who or what the key is for, e.g. research-notebook")
    create.add_argument(
        "--scope", action="append", choices=SCOPES, required=True, help="repeat for several; admin grants every scope"
    )
    create.add_argument(
        "--rate", type=float, default=None, help="requests per second for this key (default K2_API_RATE_PER_SECOND)"
    )
    create.add_argument("--burst", type=float, default=None, help="bucket size for this key (default K2_API_BURST)")
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", help="list keys (ids, names, scopes, limits; never the keys)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by id (a running API refuses it from the next request)")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)


def _file(args: argparse.Namespace) -> KeyFile:
    return KeyFile(args.file if args.file else default_keys_file())


def _create(args: argparse.Namespace) -> int:
    key, entry = _file(args).create(args.name, args.scope, args.rate, args.burst)
    print(key)
    print(
        f"created API key {entry.id} ({entry.name}) with scope(s) {', '.join(entry.scopes)} in {_file(args).path}; "
        "the key above is shown only now: store it, then send it as the X-API-Key header",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    entries = [entry.public() for entry in _file(args).read()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(
            f"no API keys in {_file(args).path}; create one with `k2 api keys create --name <who> --scope read:trades`"
        )
        return 0
    for entry in entries:
        state = f"revoked {entry['revoked_at']}" if entry["revoked_at"] else "active"
        limits = "" if entry["rate_per_second"] is None else f"  rate {entry['rate_per_second']:g}/s"
        limits += "" if entry["burst"] is None else f"  burst {entry['burst']:g}"
        print(
            f"{entry['id']}  {entry['name']:<24} {','.join(entry['scopes']):<28} created {entry['created_at']}  "
            f"{state}{limits}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    entry = _file(args).revoke(args.key_id)
    print(f"revoked API key {entry.id} ({entry.name}) at {entry.revoked_at}")
    return 0


def tls_files(settings: ApiSettings) -> dict[str, str]:
    """uvicorn's ssl_certfile and ssl_keyfile when both are configured and readable, {} when neither is."""
    cert, key = settings.tls_certfile, settings.tls_keyfile
    if not cert and not key:
        return {}
    if not cert or not key:
        raise K2Error("set both K2_API_TLS_CERT (PEM certificate) and K2_API_TLS_KEY (its PEM key), or neither")
    for variable, path in (("K2_API_TLS_CERT", cert), ("K2_API_TLS_KEY", key)):
        if not Path(path).is_file():
            raise K2Error(f"{variable}={path}: no such file")
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    use_reader_identity()  # before the workers start: they inherit the reader's environment alone
    TokenSettings.from_environment().check()  # a bad K2_API_JWT_* stops here, not in every worker
    tls = tls_files(ApiSettings())
    store = KeyStore.from_environment()
    if not store.configured:
        print(
            f"k2 api: no API keys yet ({store.file.path} has none and K2_API_KEY is unset): every data request "
            "gets 401 until you create one with `k2 api keys create --name <who> --scope read:trades` "
            "(the running API picks it up)",
            file=sys.stderr,
            flush=True,
        )
    scheme = "https" if tls else "http"
    print(f"K2 query API on {scheme}://{args.host}:{args.port} (OpenAPI at /docs)", flush=True)
    uvicorn.run(
        "k2_resources.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        log_level="info",
        **tls,  # type: ignore[arg-type]
    )
    return 0
