"""Rendered pages kept between requests: a page's bytes by (query, page, format, data version)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Rendered:
    """One page as sent, minus the per-request headers (rate limit, Link): what the page cache keeps."""

    body: bytes
    media_type: str
    next_cursor: str | None
    count: int
    partial: str | None = None


class PageCache:
    """Rendered pages by (query, page, format, data version), newest kept; thread-safe. A key holds
    the version of everything the page was read from, so a hit is the answer the read would give."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._pages: OrderedDict[tuple, Rendered] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple | None) -> Rendered | None:
        if key is None:
            return None
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def put(self, key: tuple, page: Rendered) -> None:
        with self._lock:
            if key in self._pages or len(page.body) > self.max_bytes // 4:
                return
            self._pages[key] = page
            self._bytes += len(page.body)
            while self._bytes > self.max_bytes:
                _, dropped = self._pages.popitem(last=False)
                self._bytes -= len(dropped.body)
