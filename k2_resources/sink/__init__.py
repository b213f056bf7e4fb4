"""Kafka to Iceberg: exactly-once micro-batches, the committed offsets, the follower, the sink resource."""
