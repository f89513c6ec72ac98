"""The on-disk format every writer and reader shares.

``_structure`` is a tree as JSON (from the walker's outline) and back; ``_names`` the leaves'
file and tensor names; ``_arrays`` leaf bytes and lazily read arrays; ``_npyheader`` the
``.npy`` header, through NumPy's ``np.lib.format``; ``_npyzip`` ``.npy`` files and ``.npz``
members; ``_fs`` inputs checked (no FIFOs, devices, links out of a folder; bounded sizes) and
outputs written atomically. The row storage (``_combine``) and ``tonumpy.io`` both stand on it,
which is why it is a layer of its own below them.
"""
