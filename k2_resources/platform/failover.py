"""The failover budget of the local Kafka cluster, and the deadlines that wait on a failover.

When a node of the 3-node KRaft cluster (k2_resources/platform/kafka_cluster.py) dies, nothing can
be written until the cluster notices: with ``acks=all`` every write waits for every in-sync replica,
and the dead node stays leader of its partitions and in the in-sync replicas of all of them until
the active controller fences it. Anyone who gives up in that window (a streamer closing at the end
of a recording, a flush, an admin call, a demo's wait) turns a survivable fault into spooled or
failed work. So the cluster's timing and K2's deadlines are chosen together, here.

Invariant: every deadline that waits on Kafka through a broker's failover exceeds
:data:`FAILOVER_BOUND_MS`, the worst-case time from a node's death until its partitions are led
elsewhere and its client has found the new leaders.

The bound, worst case (the killed node was the quorum's active controller and led partitions;
a killed plain broker skips the first line)::

    quorum      the followers miss the controller's fetch responses for
                controller.quorum.fetch.timeout.ms, then elect a new one within
                controller.quorum.election.timeout.ms plus a random backoff of at most
                controller.quorum.election.backoff.max.ms                     2,000 + 1,000 + 1,000
    fencing     the active controller fences a broker it has not heard from for
                broker.session.timeout.ms (a new controller starts every broker's clock
                when it takes over; brokers heartbeat every broker.heartbeat.interval.ms,
                so a live broker misses 10 heartbeats before it is fenced)            5,000
    election    the same controller write moves the fenced node's leaderships to in-sync
                replicas and drops it from every ISR; the brokers apply it from the
                metadata log                                                          1,000
    client      a producer whose requests to the dead leader failed asks for metadata
                again after retry.backoff.ms and connects within reconnect.backoff.max.ms
                                                                                100 + 1,000 (+ 400 slack)
                                                                              ---------------
    FAILOVER_BOUND_MS                                                             11,500

A follower that stays registered but stops fetching leaves the ISR after replica.lag.time.max.ms
(10,000), also below every deadline. The deadlines, each with at least twice the bound::

    StreamerConfig.close_timeout_s (flush + close at a stream's end)     30 s  (CLOSE_TIMEOUT_S)
    producer and admin request.timeout.ms (a produce waiting for the
        dead follower's ack is answered once the ISR shrinks, not cut off) 30 s  (REQUEST_TIMEOUT_MS)
    plain producer delivery.timeout.ms                                  120 s  (DELIVERY_TIMEOUT_MS)
    the spooling producer's delivery.timeout.ms (k2_resources/kafka/outbox.py)        7 days

The spooling producer's ``max_block_ms`` (2 s) is shorter on purpose and waits on nothing that a
failover delays: it bounds a ``send`` waiting for a topic's metadata, and a record it cannot hand
over goes to the spool, which is replayed in order while the streamer runs.

Kafka's own defaults (a cluster K2 did not start, e.g. docker-compose.yml) fail over within
2 + 1 + 1 + 9 + 1 + 1.5 = 15.5 s, still below the 30 s deadlines; replica.lag.time.max.ms is 30 s
there, so a stuck-but-registered follower can hold writes for up to the deadline itself.
"""

from __future__ import annotations

# -- the local cluster's timing (server.properties of every node) ---------------------------------
HEARTBEAT_INTERVAL_MS = 500
SESSION_TIMEOUT_MS = 5_000
QUORUM_FETCH_TIMEOUT_MS = 2_000
QUORUM_ELECTION_TIMEOUT_MS = 1_000
QUORUM_ELECTION_BACKOFF_MAX_MS = 1_000
REPLICA_LAG_TIME_MAX_MS = 10_000
METADATA_PROPAGATION_MS = 1_000  # a controller record reaching the brokers: not a setting, an allowance

# -- the clients ---------------------------------------------------------------------------------
RETRY_BACKOFF_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1_000
CLIENT_SLACK_MS = 400

FAILOVER_BOUND_MS = (
    QUORUM_FETCH_TIMEOUT_MS
    + QUORUM_ELECTION_TIMEOUT_MS
    + QUORUM_ELECTION_BACKOFF_MAX_MS
    + SESSION_TIMEOUT_MS
    + METADATA_PROPAGATION_MS
    + RETRY_BACKOFF_MS
    + RECONNECT_BACKOFF_MAX_MS
    + CLIENT_SLACK_MS
)

# -- the deadlines that wait on a failover ---------------------------------------------------------
REQUEST_TIMEOUT_MS = 30_000
DELIVERY_TIMEOUT_MS = 120_000
CLOSE_TIMEOUT_S = 30.0

CLUSTER_TIMING: dict[str, str] = {
    "broker.heartbeat.interval.ms": str(HEARTBEAT_INTERVAL_MS),
    "broker.session.timeout.ms": str(SESSION_TIMEOUT_MS),
    "controller.quorum.fetch.timeout.ms": str(QUORUM_FETCH_TIMEOUT_MS),
    "controller.quorum.election.timeout.ms": str(QUORUM_ELECTION_TIMEOUT_MS),
    "controller.quorum.election.backoff.max.ms": str(QUORUM_ELECTION_BACKOFF_MAX_MS),
    "replica.lag.time.max.ms": str(REPLICA_LAG_TIME_MAX_MS),
}
"""Server settings of every node of the local cluster (the failover half of the budget)."""


def waiting_deadlines_ms() -> dict[str, float]:
    """Every deadline that waits on a failover, in ms, by the setting's name (for the invariant's test)."""
    return {
        "request.timeout.ms": REQUEST_TIMEOUT_MS,
        "delivery.timeout.ms": DELIVERY_TIMEOUT_MS,
        "close_timeout_s": CLOSE_TIMEOUT_S * 1000,
    }
