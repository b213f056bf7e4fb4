"""The Iceberg catalog: the resource, its settings and errors, and K2's table definitions."""
