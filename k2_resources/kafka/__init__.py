"""Kafka: the resource, the spool, topics, the symbol partitioner, and the wire-level fetch and offsets client."""
