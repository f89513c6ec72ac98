"""Reading ``torch.save`` files safely: a dry run of the pickle, no code executed.

``_pickle_scan`` reads the pickle opcode by opcode, ``_allowlist`` says what a pickle may
name, and ``_torchfile`` rebuilds the tree from the archive with stand-ins for the allowed
objects.
"""

from ._torchfile import Checksums, read_torch

__all__ = ["Checksums", "read_torch"]
