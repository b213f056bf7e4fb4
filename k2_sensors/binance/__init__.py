"""Sensors of the Binance stream.

``stream_sensor`` is the Dagster sensor; a tick is ``observe`` (every read) -> ``decide``
(``stream_planning``) -> ``report`` (``stream_checks``), on the values of ``stream_observation``
and the memory of ``stream_cursor``. ``driver`` runs the sensor and its runs in-process.
"""
