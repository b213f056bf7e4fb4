"""ASX historical equities, CSV files to Iceberg, one trading day at a time.

- ``files``: the source CSV files, company symbols, the raw lines of a day, trading days;
- ``sydney_time``: Sydney wall-clock time to UTC, a Sydney day's UTC bounds;
- ``normalise``: checks, V2 rows and dead letters of a day, the model cross-check;
- ``columnar_trades``: the same for a day of trades read column-wise from the files (pyarrow's
  CSV reader), the fast path ``ingest_day`` takes for large days; its stages are in ``columnar/``;
- ``errors``: the ASX errors (``ColumnarDeclined``: a file needs the line-by-line path);
- ``writes``: replacing a day's rows and dead letters in Iceberg, ``ingest_day``;
- ``source``: ``AsxSourceResource``, where the files are.
"""
