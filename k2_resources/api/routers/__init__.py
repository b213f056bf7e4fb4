"""The API's routes by area: trades, bars (OHLCV), reference (symbols), operations (health, metrics)."""
