"""How leaves combine across batches, ranks and captured calls, and where the rows are kept.

``_columns`` is the column policy (one ``Column`` per leaf: form, rank, axis, dtype and padded
shape checked for every chunk) and ``_pad`` its ``pad_value`` option; ``_select`` the key-path
patterns behind ``reduce=`` and ``exclude=``; ``_storage`` the rows in memory slabs or growing
``.npy`` files, ``_directory`` the directory format written while rows arrive, ``_shards`` its
progress log, resume and rank shards read as one tree; ``_indices`` rows in dataset order.
"""
