"""Binance source: normaliser, WebSocket client, local replay server and the Kafka streamer."""
