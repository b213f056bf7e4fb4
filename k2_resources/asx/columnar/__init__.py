"""The stages of the column-wise trade reader; :mod:`k2_resources.asx.columnar_trades` drives them.

- ``parts``: a file's bytes checked (quotes, bare CRs, UTF-8) and cut into parts at line ends;
- ``skipped``: the lines the CSV reader skipped, found in a part's bytes by their texts;
- ``scan``: one part read into columns by pyarrow's CSV reader, and each line's day;
- ``fields``: the general path's field checks, vectorised (clock texts read from their bytes);
- ``columns``: the V2 columns, dictionary-encoded (ids, vendor data, constants);
- ``file_day``: one part's share of a day as V2 rows and rejected lines.
"""
