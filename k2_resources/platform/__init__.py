"""Embedded services K2 starts on one machine: the Kafka broker, the local cluster, the object store, Maven."""
