"""The failover budget (k2_resources/platform/failover.py): every deadline that waits on a broker's
failover outlasts it, the local cluster's nodes and K2's clients really use those settings, and the
cluster demo's kill points span the playback, its last seconds included."""

from __future__ import annotations

import pytest

import k2_resources.kafka.resource as kafka_module
from k2_assets.cli.cluster_demo import KillPoint
from k2_resources.binance.stream_config import StreamerConfig
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.spool import SpoolingKafkaProducer
from k2_resources.platform import failover
from k2_resources.platform.kafka_cluster import KafkaCluster


def test_every_waiting_deadline_outlasts_the_failover_bound_twice():
    deadlines = failover.waiting_deadlines_ms()
    assert deadlines, "no deadline listed"
    for name, deadline_ms in deadlines.items():
        assert deadline_ms >= 2 * failover.FAILOVER_BOUND_MS, f"{name} ({deadline_ms} ms) is too close to the bound"
    # A follower that heartbeats but stops fetching leaves the ISR within every deadline too.
    assert min(deadlines.values()) > failover.REPLICA_LAG_TIME_MAX_MS


def test_the_bound_adds_up_the_cluster_timing_and_fencing_waits_for_several_heartbeats():
    timing = failover.CLUSTER_TIMING
    assert (
        int(timing["controller.quorum.fetch.timeout.ms"])
        + int(timing["controller.quorum.election.timeout.ms"])
        + int(timing["controller.quorum.election.backoff.max.ms"])
        + int(timing["broker.session.timeout.ms"])
        + failover.RECONNECT_BACKOFF_MAX_MS
    ) <= failover.FAILOVER_BOUND_MS
    # A live broker on a loaded machine must miss many heartbeats before the controller fences it.
    assert int(timing["broker.session.timeout.ms"]) >= 8 * int(timing["broker.heartbeat.interval.ms"])
    # Kafka's defaults (a cluster K2 did not start) fail over within the close deadline as well.
    assert 2_000 + 1_000 + 1_000 + 9_000 + failover.METADATA_PROPAGATION_MS + 1_500 < failover.CLOSE_TIMEOUT_S * 1000


def test_every_cluster_node_gets_the_failover_timing(tmp_path):
    for node in KafkaCluster(home=tmp_path).nodes():
        node.home.mkdir(parents=True)
        lines = set(node._properties().read_text().splitlines())
        assert {f"{name}={value}" for name, value in failover.CLUSTER_TIMING.items()} <= lines


def test_clients_and_the_streamer_wait_longer_than_a_failover(monkeypatch, tmp_path):
    seen: dict = {}
    monkeypatch.setattr(kafka_module, "KafkaProducer", lambda **config: seen.update(config))
    KafkaResource(bootstrap_servers="127.0.0.1:1").producer()
    assert seen["request_timeout_ms"] == failover.REQUEST_TIMEOUT_MS
    assert seen["delivery_timeout_ms"] == failover.DELIVERY_TIMEOUT_MS
    assert seen["reconnect_backoff_max_ms"] == failover.RECONNECT_BACKOFF_MAX_MS
    assert StreamerConfig().close_timeout_s == failover.CLOSE_TIMEOUT_S
    spooling = SpoolingKafkaProducer(object(), tmp_path)
    assert spooling.close_timeout_s == failover.CLOSE_TIMEOUT_S


def test_a_kill_point_is_given_or_drawn_from_a_reported_seed():
    assert KillPoint.choose(kill_at=0.95) == KillPoint(0.95, None)
    with pytest.raises(K2Error, match="--kill-at 1.5"):
        KillPoint.choose(kill_at=1.5)
    assert KillPoint.choose(seed=7) == KillPoint.choose(seed=7)
    drawn = KillPoint.choose()
    assert drawn.seed is not None and KillPoint.choose(seed=drawn.seed) == drawn
    fractions = [KillPoint.choose(seed=seed).fraction for seed in range(200)]
    assert min(fractions) < 0.2 and 0.4 < sorted(fractions)[100] < 0.6
    # The stream's last seconds are drawn too: there the failover meets the streamer's close.
    assert any(fraction > 0.97 for fraction in fractions)


def test_a_kill_point_is_a_share_of_the_trades_in_kafka():
    total = 37_563
    counts = [KillPoint(fraction).records(total) for fraction in (0.0, 0.1, 0.5, 0.95, 1.0)]
    assert counts == [1, 3_756, 18_782, 35_685, total]
