"""binance domain: assets, checks, jobs and schedules."""
