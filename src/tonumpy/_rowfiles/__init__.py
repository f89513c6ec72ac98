"""Files of rows, written as batches arrive and read back as one tree.

``_parquet`` is the Parquet format (the row-group writer, the readers' checks; pyarrow imported
on first use); ``_parquet_sink`` writes ``Accumulator(directory=, format="parquet")`` a row
group per batch; ``_shards`` keeps a directory's progress log, completion mark and
``resume=True``, and reads a set of rank shards (``.npy`` or Parquet) as one tree. They sit
above ``tonumpy.table`` (Parquet rows are ``to_columns``' columns) and below ``accumulate`` and
``io``, which both write them.
"""
