"""Scheduled replays: a window of market.trades re-played in time order into a Kafka topic."""

from datetime import UTC, datetime, timedelta

from dagster import (
    Config,
    DefaultScheduleStatus,
    OpExecutionContext,
    RunRequest,
    ScheduleEvaluationContext,
    job,
    op,
    schedule,
)
from pydantic import Field

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import replay_trades_topic
from k2_resources.operations.replay_topic import ReplaySpec, replay_to_kafka
from k2_resources.trades.time_ordered import TimeOrderedReader


class ReplayConfig(Config):
    """The window to replay; the defaults replay the ASX trading day of 11 March 2014."""

    topic: str = Field(default=replay_trades_topic("asx-2014-03-11"), description="Kafka topic to replay into")
    start: str = Field(default="2014-03-11T00:00:00+11:00", description="window start, ISO 8601 with offset")
    end: str = Field(default="2014-03-12T00:00:00+11:00", description="window end (exclusive)")
    symbols: list[str] = Field(default_factory=list, description="symbols to replay; empty: all")
    exchange: str = Field(default="", description="exchange to replay; empty: all")
    speed: float = Field(default=0.0, ge=0.0, description="speed factor (60: an hour a minute); 0: as fast as possible")


@op(tags={"k2/kind": "replay"})
def replay_trades(context: OpExecutionContext, config: ReplayConfig, kafka: KafkaResource, iceberg: IcebergResource):
    """Replay the configured window of market.trades into its topic, resuming a partial replay."""
    spec = ReplaySpec(
        topic=config.topic,
        start=datetime.fromisoformat(config.start),
        end=datetime.fromisoformat(config.end),
        symbols=tuple(config.symbols) or None,
        exchange=config.exchange or None,
    )
    result = replay_to_kafka(spec, kafka, TimeOrderedReader(iceberg), speed=config.speed or None)
    context.log.info(
        f"replay {result.replay_id} of snapshot {result.snapshot_id}: {result.total} trades in the window, "
        f"{result.already_in_topic} already in {result.topic}, {result.produced} produced now"
    )
    context.add_output_metadata(
        {
            "topic": result.topic,
            "total": result.total,
            "produced": result.produced,
            "already_in_topic": result.already_in_topic,
        }
    )
    return result.total


@job(
    tags={"k2/kind": "replay"}, description="Replay a window of market.trades into a Kafka replay topic, in time order."
)
def trades_replay():
    replay_trades()


@schedule(
    job=trades_replay,
    cron_schedule="30 2 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Every night, replay the previous UTC day of market.trades into replay.trades.<day>.",
)
def trades_replay_nightly(context: ScheduleEvaluationContext) -> RunRequest:
    day = (context.scheduled_execution_time.astimezone(UTC) - timedelta(days=1)).date()
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return RunRequest(
        run_key=f"replay-{day.isoformat()}",
        run_config={
            "ops": {
                "replay_trades": {
                    "config": {
                        "topic": replay_trades_topic(day.isoformat()),
                        "start": start.isoformat(),
                        "end": (start + timedelta(days=1)).isoformat(),
                    }
                }
            }
        },
    )
