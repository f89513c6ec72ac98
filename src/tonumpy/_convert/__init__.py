"""Below the router of ``tonumpy.convert``: how leaves become arrays.

``_leaf`` converts one leaf carefully (every tensor kind); ``_bulk`` holds the measured CPU
passes over many plain tensors at once; ``_transfer`` is the device-to-host engine
(``PendingTransfer``) and ``_staging`` its pinned staging pool.
"""
