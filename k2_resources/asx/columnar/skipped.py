"""Stage 2 of the column-wise trade reader: the lines the CSV reader skipped, found by their texts.

The reader gives no line numbers when it reads in parallel; the lines it skipped (another width,
empty) are located in the part's bytes by their texts, which gives every line its exact number.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def _line_starts_of(data: bytes, text: bytes, start: int, end: int) -> list[int]:
    """Byte offsets of every line in ``data[start:end]`` (whole lines) whose content (without its LF
    or CRLF) is exactly ``text``."""

    def ends_a_line(at: int) -> bool:
        return at == len(data) or data.startswith(b"\n", at) or data.startswith(b"\r\n", at)

    if not text:  # empty lines: one search per line end
        ends = (b"\n", b"\r\n") if b"\r" in data else (b"\n",)
        found = [start] if start < end and any(data.startswith(line_end, start) for line_end in ends) else []
        for line_end in ends:
            at = data.find(b"\n" + line_end, start, end)
            while at >= 0:
                found.append(at + 1)
                at = data.find(b"\n" + line_end, at + 1, end)
        return sorted(found)
    found = [start] if data.startswith(text, start) and ends_a_line(start + len(text)) else []
    needle = b"\n" + text  # one pass over the part: where the text starts a line, then what follows it
    at = data.find(needle, start, end)
    while at >= 0:
        if ends_a_line(at + len(needle)):
            found.append(at + 1)
        at = data.find(needle, at + 1, end)
    return found


def _searched(data: bytes, start: int, end: int, wanted: Counter[bytes]) -> list[tuple[int, bytes]] | None:
    """Each wanted line found by a search of the part for its text (one pass per text)."""
    located: list[tuple[int, bytes]] = []
    for text, count in wanted.items():
        starts = _line_starts_of(data, text, start, end)
        if len(starts) != count:
            return None
        located += [(at, text) for at in starts]
    located.sort()
    found, line, previous = [], 0, start
    for at, text in located:
        line += data.count(b"\n", previous, at)
        previous = at
        found.append((line, text))
    return found


def _compared(
    data: bytes, start: int, end: int, line_count: int, wanted: Counter[bytes]
) -> list[tuple[int, bytes]] | None:
    """Each wanted line found among the part's lines of its length, all compared at once (one
    cost, whatever the number of texts)."""
    view = np.frombuffer(data, dtype=np.uint8)[start:end]
    line_feeds = np.flatnonzero(view == 10)
    starts = np.concatenate([np.zeros(1, dtype=np.int64), line_feeds + 1])[:line_count]
    ends = np.concatenate([line_feeds, np.array([len(view)], dtype=np.int64)])[:line_count]
    ends -= (ends > starts) & (view[np.maximum(ends - 1, 0)] == 13)  # a CRLF ends the line too
    lengths = ends - starts
    by_length: dict[int, list[bytes]] = {}
    for text in wanted:
        by_length.setdefault(len(text), []).append(text)
    found: list[tuple[int, bytes]] = []
    for length, texts in by_length.items():
        candidates = np.flatnonzero(lengths == length)
        if length:
            # Each candidate line as one fixed-width numpy byte string; equal-length ones compare
            # exactly. The texts of the matches are then read from the bytes (numpy drops
            # trailing NULs when it gives an "S" value back).
            targets = np.array(texts, dtype=f"S{length}")
            rows = max(1, (4 << 20) // length)  # candidates per grid: its byte offsets stay under 32 MB
            candidates = np.concatenate(
                [
                    chunk[np.isin(view[starts[chunk][:, None] + np.arange(length)].view(f"S{length}").ravel(), targets)]
                    for chunk in np.array_split(candidates, max(1, -(-len(candidates) // rows)))
                ]
            )
        if len(candidates) != sum(wanted[text] for text in texts):
            return None
        found += [
            (line, data[start + at : start + at + length])
            for line, at in zip(candidates.tolist(), starts[candidates].tolist())
        ]
    return found if Counter(text for _, text in found) == wanted else None


# Up to this many distinct texts, the skipped lines are searched for one text at a time; more
# are compared all at once: a hostile feed's thousands of distinct bad lines, searched one by
# one, would cost one pass over the part each.
_SEARCHED_TEXTS = 4


def skipped_lines(
    data: bytes, start: int, end: int, line_count: int, skipped: list[str], empty_lines: int
) -> tuple[np.ndarray, list[str]] | None:
    """(0-based line indices in the part, texts) of the lines of ``data[start:end]`` (``line_count``
    whole lines) the CSV reader skipped: those it handed to the invalid-row handler (``skipped``,
    other widths) and ``empty_lines`` empty ones. The reader gives no line numbers when it reads
    in parallel, so each is found by its text; None when the lines found do not match the
    reader's counts exactly."""
    wanted = Counter(text.encode("utf-8") for text in skipped)
    if empty_lines:
        wanted[b""] = empty_lines
    if len(wanted) <= _SEARCHED_TEXTS:
        found = _searched(data, start, end, wanted)
    else:
        found = _compared(data, start, end, line_count, wanted)
    if found is None:
        return None
    found.sort()
    return np.array([line for line, _ in found], dtype=np.int64), [text.decode("utf-8") for _, text in found]
