"""SQL over K2's tables: DuckDB views and the light SQL path."""
