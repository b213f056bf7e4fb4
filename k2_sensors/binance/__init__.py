"""Sensors of the Binance stream: stream_sensor (the Dagster sensor), stream_rules (its pure rules), driver."""
