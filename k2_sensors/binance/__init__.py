"""Sensors of the Binance stream: stream_sensor (the Dagster sensor), stream_state (its rules), driver."""
