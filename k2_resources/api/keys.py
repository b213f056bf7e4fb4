"""API keys of the query API: created once, stored hashed, checked in constant time.

A key looks like ``k2_<id>_<secret>``: ``id`` (12 hex characters) is public and names the key in
the file, in logs and in ``k2 api keys list``; ``secret`` (32 random bytes, URL-safe base64)
is shown once, when the key is created, and stored only as a salted scrypt hash. A request's
key is found by its id, then its secret is hashed with the stored salt and compared with
``hmac.compare_digest``. scrypt costs tens of milliseconds, so a key that verified once is
remembered in memory (by the SHA-256 of the whole key) until the file changes. Every request
looks at the file's stat (microseconds; ``reload_interval_s`` 0) and a change (a rewrite replaces
the file: new inode, times and size) drops that memory, so a revocation is refused from the next
request on, in every worker process (each has its own store and checks the same file).

The file (default ``K2_HOME/api/keys.json``, or ``K2_API_KEYS_FILE``) holds::

    {"version": 1, "keys": [{"id": ..., "name": ..., "scopes": [...], "salt": ..., "hash": ...,
      "scrypt": {"n": 16384, "r": 8, "p": 1}, "created_at": ..., "revoked_at": null,
      "rate_per_second": null, "burst": null}]}

``K2_API_KEY`` adds one bootstrap key with every scope, without a file (it is already in the
environment in plain text, so it is kept only as its SHA-256).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from k2_resources.errors import K2Error
from k2_resources.paths import k2_home

READ_TRADES = "read:trades"
READ_OHLCV = "read:ohlcv"
ADMIN = "admin"
SCOPES = (READ_TRADES, READ_OHLCV, ADMIN)  # admin grants every scope

KEY_PREFIX = "k2_"
ID_LENGTH = 12
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
BOOTSTRAP_KEY_ID = "env"


def default_keys_file() -> Path:
    """``$K2_API_KEYS_FILE``, else ``K2_HOME/api/keys.json``."""
    configured = os.environ.get("K2_API_KEYS_FILE")
    return Path(configured).expanduser() if configured else k2_home() / "api" / "keys.json"


def _scrypt(secret: str, salt: bytes, params: dict[str, int]) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=params["n"], r=params["r"], p=params["p"], maxmem=256 * 1024 * 1024, dklen=32
    )


@dataclass
class ApiKey:
    """One stored key: who it is for, what it may read, its own limits, and its hash (never the key)."""

    id: str
    name: str
    scopes: list[str]
    salt: str
    hash: str
    scrypt: dict[str, int] = field(default_factory=lambda: dict(SCRYPT))
    created_at: str = ""
    revoked_at: str | None = None
    rate_per_second: float | None = None  # None: the API's default
    burst: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    def public(self) -> dict:
        """Everything but the salt and hash, for listings."""
        return {k: v for k, v in asdict(self).items() if k not in ("salt", "hash", "scrypt")}


def _validate_scopes(scopes: list[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise K2Error(f"unknown or no scope(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCOPES)}")
    return sorted(set(scopes))


class KeyFile:
    """The keys file: read, and changed under an exclusive lock with an atomic replace (mode 0600)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_keys_file()

    def read(self) -> list[ApiKey]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as exc:
            raise K2Error(
                f"the API keys file {self.path} cannot be read ({exc}); fix or delete it and "
                "create keys again with `k2 api keys create`"
            ) from exc
        try:
            return [ApiKey(**entry) for entry in raw.get("keys", [])]
        except TypeError as exc:
            raise K2Error(
                f"the API keys file {self.path} has an entry K2 does not know ({exc}); "
                "it is written by `k2 api keys create`, not by hand"
            ) from exc

    @contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self.read()
            yield keys
            temporary = self.path.with_suffix(".tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"version": 1, "keys": [asdict(k) for k in keys]}, handle, indent=2)
                handle.write("\n")
            os.replace(temporary, self.path)

    def create(
        self, name: str, scopes: list[str], rate_per_second: float | None = None, burst: float | None = None
    ) -> tuple[str, ApiKey]:
        """A new key: (the key itself, shown once; its stored entry)."""
        scopes = _validate_scopes(scopes)
        for value, label in ((rate_per_second, "rate"), (burst, "burst")):
            if value is not None and value <= 0:
                raise K2Error(f"--{label} {value} must be positive")
        with self._locked() as keys:
            taken = {k.id for k in keys}
            key_id = secrets.token_hex(ID_LENGTH // 2)
            while key_id in taken:
                key_id = secrets.token_hex(ID_LENGTH // 2)
            secret = secrets.token_urlsafe(32)
            salt = secrets.token_bytes(16)
            entry = ApiKey(
                id=key_id,
                name=name,
                scopes=scopes,
                salt=salt.hex(),
                hash=_scrypt(secret, salt, SCRYPT).hex(),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                rate_per_second=rate_per_second,
                burst=burst,
            )
            keys.append(entry)
        return f"{KEY_PREFIX}{key_id}_{secret}", entry

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (kept in the file, so the listing shows when)."""
        with self._locked() as keys:
            for entry in keys:
                if entry.id == key_id:
                    if entry.revoked_at is None:
                        entry.revoked_at = datetime.now(UTC).isoformat(timespec="seconds")
                    return entry
        raise K2Error(f"no API key with id {key_id!r} in {self.path}; see `k2 api keys list`")


def parse_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed ``k2_<id>_<secret>`` key, else None."""
    if not presented.startswith(KEY_PREFIX) or len(presented) <= len(KEY_PREFIX) + ID_LENGTH + 1:
        return None
    key_id = presented[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_LENGTH]
    if presented[len(KEY_PREFIX) + ID_LENGTH] != "_":
        return None
    return key_id, presented[len(KEY_PREFIX) + ID_LENGTH + 1 :]


class KeyStore:
    """Answers "which key is this?" for requests; re-reads the file when it changes."""

    def __init__(
        self, path: Path | None = None, bootstrap_key: str | None = None, reload_interval_s: float = 0.0
    ) -> None:
        self.file = KeyFile(path)
        self.reload_interval_s = reload_interval_s
        self._bootstrap_digest = hashlib.sha256(bootstrap_key.encode()).digest() if bootstrap_key else None
        self._bootstrap = ApiKey(id=BOOTSTRAP_KEY_ID, name="K2_API_KEY", scopes=[ADMIN], salt="", hash="")
        self._keys: dict[str, ApiKey] = {}
        self._verified: dict[bytes, str] = {}  # sha256(presented key) -> key id
        self._stamp: tuple[int, int, int, int] | None = None  # mtime_ns, ctime_ns, size, inode
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self._refresh(force=True)

    @classmethod
    def from_environment(cls) -> KeyStore:
        return cls(default_keys_file(), os.environ.get("K2_API_KEY") or None)

    @property
    def configured(self) -> bool:
        """Whether any key could authenticate (a file with keys, or K2_API_KEY)."""
        self._refresh()
        return bool(self._bootstrap_digest) or any(not k.revoked for k in self._keys.values())

    def _refresh(self, force: bool = False, recheck: bool = False) -> None:
        """Re-read the keys file when it changed; its stat is looked at once per reload interval (every
        call by default), or at once with ``recheck`` (a key id not known yet: just created)."""
        now = time.monotonic()
        if not force and not recheck and now - self._checked_at < self.reload_interval_s:
            return
        with self._lock:
            self._checked_at = now
            try:
                info = self.file.path.stat()
                stamp = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)  # a rewrite: new inode
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and not force:
                return
            self._keys = {k.id: k for k in self.file.read()}
            self._verified = {}  # a revoked or replaced key must verify again
            self._stamp = stamp

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key's entry when ``presented`` is a valid, unrevoked key, else None."""
        self._refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        if self._bootstrap_digest is not None and hmac.compare_digest(digest, self._bootstrap_digest):
            return self._bootstrap
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        entry = self._keys.get(key_id)
        if entry is None:
            self._refresh(recheck=True)
            entry = self._keys.get(key_id)
        if entry is None or entry.revoked:
            return None
        if self._verified.get(digest) == key_id:
            return entry
        expected = bytes.fromhex(entry.hash)
        if not hmac.compare_digest(_scrypt(secret, bytes.fromhex(entry.salt), entry.scrypt), expected):
            return None
        with self._lock:
            self._verified[digest] = key_id
        return entry
