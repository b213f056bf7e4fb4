"""Operating the platform: table maintenance, Kafka replays, the metrics exporter, table metrics."""
