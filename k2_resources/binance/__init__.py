"""Binance source: normaliser, WebSocket client, local recording server and the Kafka streamer."""
