"""Helpers shared by the test suite: example trees, tiny models, hostile files, strategies."""
