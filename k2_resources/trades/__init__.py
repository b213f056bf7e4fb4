"""The normalised trades table: Kafka offsets recorded in Iceberg, and exactly-once micro-batches."""
