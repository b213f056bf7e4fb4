"""Read an offset range of one partition as Arrow columns, without a Python object per message.

kafka-python turns every fetched record into a ``ConsumerRecord`` in pure Python (varints, CRC
per batch, timestamp type, headers): on 2 cores that per-message work is most of what a raw
``poll`` loop costs, paid in full before decoding. Here the range is
fetched with plain Fetch requests (v4, the oldest version Kafka 4 serves) on one socket to the
bootstrap broker, and the record batches in the response are parsed for all messages at once
with numpy (the same lock-step varint walk the Avro decoder uses): each batch's CRC-32C is
checked, and the result is the offsets and the values as one Arrow binary array.

It covers the common case only and says so (``FastFetchUnavailable``): the caller then reads
the range with kafka-python, which handles every other case exactly (another broker
leads the partition, an error code such as offsets deleted by retention, a compressed,
transactional or pre-v2 batch, a null value, offsets that skip).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import numpy as np
import pyarrow as pa
from kafka.protocol.consumer import FetchRequest, FetchResponse
from kafka.record.util import calc_crc32c

from k2_resources.kafka.errors import FastFetchUnavailable
from k2_resources.kafka.security import PLAINTEXT, PROTOCOL_VARIABLE
from k2_resources.schemas.columnar import _Walk

FETCH_VERSION = 4
# Record batch v2 header: baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes,
# lastOffsetDelta, baseTimestamp, maxTimestamp, producerId, producerEpoch, baseSequence, records.
_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
_LENGTH_OF_OFFSET_AND_SIZE = 12  # baseOffset + batchLength: batchLength counts the bytes after them
_CRC_FROM = 21  # the CRC covers the batch from the attributes on
_COMPRESSION_MASK, _TRANSACTIONAL, _CONTROL = 0x07, 0x10, 0x20


def _host_port(servers: str) -> tuple[str, int]:
    first = servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class BrokerConnection:
    """One plain-text Kafka connection that sends a request and waits for its response."""

    def __init__(self, servers: str, client_id: str, timeout_s: float) -> None:
        self.client_id = client_id
        if os.environ.get(PROTOCOL_VARIABLE, PLAINTEXT).strip().upper() not in ("", PLAINTEXT):
            # This plain socket speaks neither TLS nor SASL: a secured cluster is read by kafka-python.
            raise FastFetchUnavailable(f"{PROTOCOL_VARIABLE} is set: the cluster is read through kafka-python")
        try:
            self.sock = socket.create_connection(_host_port(servers), timeout=timeout_s)
        except (OSError, ValueError) as exc:
            raise FastFetchUnavailable(f"cannot open a plain connection to {servers}: {exc}") from exc
        self.correlation = 0

    def fetch(self, topic: str, partition: int, offset: int, max_bytes: int, max_wait_ms: int) -> Any:
        request = FetchRequest(
            replica_id=-1,
            max_wait_ms=max_wait_ms,
            min_bytes=1,
            max_bytes=max_bytes,
            isolation_level=0,
            topics=[
                FetchRequest.FetchTopic(
                    topic=topic,
                    partitions=[
                        FetchRequest.FetchTopic.FetchPartition(
                            partition=partition, fetch_offset=offset, partition_max_bytes=max_bytes
                        )
                    ],
                )
            ],
        )
        return self.send(request, FETCH_VERSION, FetchResponse)

    def send(self, request: Any, version: int, response_type: Any) -> Any:
        """Send ``request`` (a kafka-python protocol message) at ``version``; its decoded response."""
        self.correlation += 1
        request.with_header(correlation_id=self.correlation, client_id=self.client_id)
        try:
            self.sock.sendall(request.encode(version=version, header=True, framed=True))
            (size,) = struct.unpack(">i", self._exactly(4))
            payload = self._exactly(size)
        except OSError as exc:
            raise FastFetchUnavailable(f"{type(request).__name__} failed: {exc}") from exc
        (correlation,) = struct.unpack_from(">i", payload)
        if correlation != self.correlation:
            raise FastFetchUnavailable(f"response to request {correlation}, expected {self.correlation}")
        return response_type.decode(memoryview(payload)[4:], version=version)

    def _exactly(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            read = self.sock.recv_into(view[got:], size - got)
            if not read:
                raise OSError("the broker closed the connection")
            got += read
        return bytes(buffer)

    def close(self) -> None:
        self.sock.close()


def parse_record_batches(records: bytes, expected: int, end: int) -> tuple[np.ndarray, pa.LargeBinaryArray, int]:
    """The records of offsets [expected, end) in ``records`` (a fetch response's record set):
    (offsets, values, the next offset to fetch). A batch cut off at the end of the response is
    left for the next fetch. Raises FastFetchUnavailable for anything but plain v2 batches of
    non-null values with contiguous offsets."""
    data = np.frombuffer(records, np.uint8)
    batch_starts, batch_counts, base_offsets, next_offset = [], [], [], expected
    position = 0
    while position + _BATCH_HEADER.size <= len(records):
        (base, length, _epoch, magic, crc, attributes, last_delta, _t0, _t1, _pid, _pepoch, _seq, count) = (
            _BATCH_HEADER.unpack_from(records, position)
        )
        batch_end = position + _LENGTH_OF_OFFSET_AND_SIZE + length
        if batch_end > len(records):
            break  # partial batch: the broker cut the response at max_bytes
        if magic != 2:
            raise FastFetchUnavailable(f"record batch of magic {magic} at offset {base}")
        if attributes & (_COMPRESSION_MASK | _TRANSACTIONAL | _CONTROL):
            raise FastFetchUnavailable(f"compressed, transactional or control batch at offset {base}")
        if calc_crc32c(memoryview(records)[position + _CRC_FROM : batch_end]) != crc:
            raise FastFetchUnavailable(f"record batch at offset {base} failed its CRC check")
        if base + last_delta >= expected and base < end:
            batch_starts.append(position + _BATCH_HEADER.size)
            batch_counts.append(count)
            base_offsets.append(base)
        next_offset = base + last_delta + 1
        position = batch_end
    if not batch_starts:
        return np.zeros(0, np.int64), pa.array([], pa.large_binary()), next_offset
    counts = np.array(batch_counts, np.int64)
    # Records follow each other inside a batch: walk the k-th record of every batch at once.
    cursor = np.array(batch_starts, np.int64)
    record_starts = np.zeros(int(counts.sum()), np.int64)
    slot = np.concatenate([[0], np.cumsum(counts)[:-1]])
    walk = _Walk(data, cursor, np.full(cursor.size, len(records), np.int64), np.ones(cursor.size, bool))
    record_ends = np.zeros(record_starts.size, np.int64)
    for step in range(int(counts.max())):
        rows = np.flatnonzero(counts > step)
        rows, lengths = walk.varint(rows)
        if not walk.ok.all():
            raise FastFetchUnavailable("a record length runs past the response")
        record_starts[slot[rows] + step] = walk.pos[rows]
        walk.pos[rows] += lengths
        record_ends[slot[rows] + step] = walk.pos[rows]
    batch_of_record = np.repeat(np.arange(counts.size), counts)
    n = record_starts.size
    fields = _Walk(data, record_starts + 1, record_ends, np.ones(n, bool))  # + 1: the attributes byte
    everything = np.arange(n)
    fields.varint(everything)  # timestamp delta
    _, offset_delta = fields.varint(everything)
    _, key_length = fields.varint(everything)
    if not fields.ok.all():
        raise FastFetchUnavailable("a record header runs past its record")
    fields.pos += np.maximum(key_length, 0)
    _, value_length = fields.varint(everything)
    value_starts = fields.pos.copy()
    if not fields.ok.all() or (value_length < 0).any() or (value_starts + value_length > record_ends).any():
        raise FastFetchUnavailable("a null value or a record value past its record")
    offsets = np.asarray(base_offsets, np.int64)[batch_of_record] + offset_delta
    wanted = (offsets >= expected) & (offsets < end)
    offsets, value_starts, value_length = offsets[wanted], value_starts[wanted], value_length[wanted]
    if offsets.size and (offsets[0] != expected or (np.diff(offsets) != 1).any()):
        raise FastFetchUnavailable(f"offsets do not run contiguously from {expected}")
    if offsets.size == 0:
        return offsets, pa.array([], pa.large_binary()), max(next_offset, expected)
    # Each value lies in the response as it is: an array whose entries alternate value, gap between
    # values, value, ... over the response's bytes; taking every other entry copies the values once.
    edges = np.empty(2 * offsets.size, np.int64)
    edges[0::2], edges[1::2] = value_starts, value_starts + value_length
    interleaved = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), edges.size - 1, [None, pa.py_buffer(edges), pa.py_buffer(records)]
    )
    values = interleaved.take(pa.array(np.arange(0, edges.size - 1, 2)))
    return offsets, values, int(offsets[-1]) + 1 if offsets.size else max(next_offset, expected)


def fetch_range(
    servers: str,
    client_id: str,
    topic: str,
    partition: int,
    start: int,
    end: int,
    timeout_s: float = 120.0,
    max_bytes: int = 64 * 1024 * 1024,
    connection: BrokerConnection | None = None,
) -> tuple[pa.Int64Array, pa.LargeBinaryArray]:
    """Offsets [start, end) of ``topic[partition]``: (offsets, values) as Arrow arrays, in order.
    ``connection``: one the caller keeps open between fetches (it is not closed here); by default
    a connection of its own."""
    owned = connection is None
    if connection is None:
        connection = BrokerConnection(servers, client_id, min(timeout_s, 30.0))
    offset_parts, value_parts = [], []
    expected = start
    deadline = time.monotonic() + timeout_s
    try:
        while expected < end:
            if time.monotonic() > deadline:
                raise FastFetchUnavailable(f"only {expected - start} of {end - start} messages within {timeout_s:.0f}s")
            response = connection.fetch(topic, partition, expected, max_bytes, 500)
            answer = response.responses[0].partitions[0]
            if answer.error_code != 0:
                raise FastFetchUnavailable(f"fetch of {topic}[{partition}]@{expected}: error code {answer.error_code}")
            records = answer.records or b""
            if not records:
                if answer.high_watermark <= expected:
                    raise FastFetchUnavailable(f"{topic}[{partition}] ends at {answer.high_watermark}, before {end}")
                continue
            offsets, values, expected_next = parse_record_batches(bytes(records), expected, end)
            if offsets.size == 0 and expected_next <= expected:
                raise FastFetchUnavailable(f"a record batch at {expected} is larger than {max_bytes} bytes")
            offset_parts.append(offsets)
            value_parts.append(values)
            expected = expected_next
    finally:
        if owned:
            connection.close()
    values = pa.concat_arrays(value_parts) if value_parts else pa.array([], pa.large_binary())
    return pa.array(np.concatenate(offset_parts) if offset_parts else np.zeros(0, np.int64), pa.int64()), values
