"""Reading market.trades: the hybrid resource (Iceberg plus the Kafka tail), snapshot reads, the
time-ordered reader."""
