"""Analytics over market.trades: OHLCV bars and the tables that hold them."""
