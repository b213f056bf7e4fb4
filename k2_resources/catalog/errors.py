"""One clear error when the Iceberg catalog or its object store does not answer.

A REST catalog or an S3 store that is down surfaces deep inside pyiceberg as a ``requests``
connection error (the catalog) or a pyarrow ``OSError`` from the AWS SDK (the store), with a
stack of library frames. :func:`catalog_unavailable` recognises both and says which service, at
which address, from which variable, and the fix; :func:`explaining_catalog_errors` raises it
instead of the library's error. Nothing is committed when either is down, and K2's commits check
the committed offsets first, so re-running after the service is back commits exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from requests.exceptions import ConnectionError as RequestsConnectionError

from k2_resources.catalog.settings import catalog_properties
from k2_resources.errors import K2Error

# How a connection that was refused or reset reads in the AWS SDK's messages (pyarrow's S3 client).
_NETWORK_WORDS = (
    "connection refused",
    "couldn't connect",
    "network_connection",
    "curlcode: 7",
    "connection reset",
    "failed to connect",
    "timed out connecting",
)


class CatalogUnavailableError(K2Error):
    """The Iceberg catalog or the object store holding the table files does not answer."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def catalog_unavailable(exc: BaseException, configured: dict[str, str] | None = None) -> CatalogUnavailableError | None:
    """The clear error for ``exc`` when it means the catalog or its object store is unreachable, else None."""
    properties = catalog_properties(configured)
    catalog_uri = properties.get("uri", "")
    s3_endpoint = properties.get("s3.endpoint", "")
    for cause in _chain(exc):
        text = str(cause)
        if isinstance(cause, RequestsConnectionError) or (
            isinstance(cause, ConnectionError) and catalog_uri and _host_port(catalog_uri) in text
        ):
            what = f"the Iceberg REST catalog at {catalog_uri} (K2_ICEBERG_CATALOG_URI)"
        elif isinstance(cause, OSError) and any(word in text.lower() for word in _NETWORK_WORDS):
            where = s3_endpoint or "the configured S3 endpoint"
            what = f"the object store at {where} (K2_S3_ENDPOINT) holding the table files"
        else:
            continue
        reason = " ".join(text.split())[:300]
        return CatalogUnavailableError(
            f"{what} does not answer ({reason}); nothing was committed. Fix: start it (`k2 cluster start` "
            "runs the local object store and catalog) or point the variable at a running one, then run again: "
            "a re-run commits its offset range exactly once"
        )
    return None


@contextmanager
def explaining_catalog_errors(configured: dict[str, str] | None = None) -> Iterator[None]:
    """Raise :class:`CatalogUnavailableError` instead of the library's error when the catalog or store is down."""
    try:
        yield
    except CatalogUnavailableError:
        raise
    except Exception as exc:
        clear = catalog_unavailable(exc, configured)
        if clear is None:
            raise
        raise clear from exc


class CommitConflictError(K2Error):
    """Every attempt of an Iceberg commit lost to another writer's commit (or met a locked catalog).

    Nothing was committed by the failed attempts; running the same work again is safe and may succeed.
    """

    retriable = True


class CommitRetry(K2Error):
    """Raised inside a commit attempt to have the commit layer reload the table and try again.

    A control-flow signal of :func:`k2_resources.catalog.commit.with_commit_retries` (for example
    after a table property the attempt depends on was just changed); never reaches a caller.
    """

    retriable = True


class TableChangedError(K2Error):
    """The table's schema or partition spec changed after data files were written for it; the files
    no longer fit, so the rows must be written again against the table as it is now."""
