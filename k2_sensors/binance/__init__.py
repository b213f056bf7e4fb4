"""Sensors of the Binance stream."""

from k2_sensors.binance.stream_sensor import binance_stream_sensor

__all__ = ["binance_stream_sensor"]
