"""Exceptions raised by tonumpy, and the warnings it gives.

Every exception carries ``.path``, the key path (a tuple of keys, indices and field names, as
``optree.tree_paths`` gives it) of the leaf or node where the problem was found, or ``None``
when the problem is not tied to one place in the tree. Each also subclasses the built-in exception
that code written before tonumpy would catch.

Warnings are [`TonumpyWarning`][] subclasses (so ``UserWarning``s): silence one kind with
``warnings.filterwarnings("ignore", category=...)`` or make it an error with
``warnings.filterwarnings("error", category=...)`` (or ``python -W error::UserWarning``).
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = [
    "CaptureError",
    "ConversionError",
    "DestinationExistsError",
    "FileFormatError",
    "MissingDependencyError",
    "OptionError",
    "TonumpyError",
    "TonumpyWarning",
    "UncheckedObjectWarning",
    "UnmatchedPatternWarning",
    "UnsafeFileError",
    "UnsupportedLeafError",
]

_Error = TypeVar("_Error", bound="TonumpyError")


class TonumpyError(Exception):
    """Base class of every error tonumpy raises.

    An error whose fix is an option of the function called (``overwrite=True``, say) names it
    in ``.option``; [`with_option`][tonumpy.TonumpyError.with_option] gives the message with that
    option spelt another way, as the ``tonumpy`` command spells its flags.

    Args:
        message: What went wrong, where, and how to fix it.
        path: The key path of the offending leaf or node, if there is one.
    """

    path: tuple[Any, ...] | None
    #: The keyword argument the message tells the caller to set to True, if any.
    option: str | None = None
    _around: tuple[str, str] | None = None  # the message before and after the option

    def __init__(self, message: str, *, path: tuple[Any, ...] | None = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def naming(
        cls: type[_Error],
        before: str,
        option: str,
        after: str,
        *,
        path: tuple[Any, ...] | None = None,
    ) -> _Error:
        """The error whose message is ``before``, then ``option=True``, then ``after``.

        Examples:
            >>> error = TonumpyError.naming("out.npz exists; pass ", "overwrite", " to replace it")
            >>> str(error), error.option
            ('out.npz exists; pass overwrite=True to replace it', 'overwrite')
        """
        error = cls(f"{before}{option}=True{after}", path=path)
        error.option = option
        error._around = (before, after)
        return error

    def with_option(self, spelling: str) -> str:
        """The message, naming its ``.option`` as ``spelling`` instead of ``option=True``.

        Examples:
            >>> error = TonumpyError.naming("out.npz exists; pass ", "overwrite", " to replace it")
            >>> error.with_option("--force")
            'out.npz exists; pass --force to replace it'
            >>> TonumpyError("no option here").with_option("--force")
            'no option here'
        """
        if self._around is None:
            return str(self)
        before, after = self._around
        return f"{before}{spelling}{after}"


class ConversionError(TonumpyError, ValueError):
    """A leaf or a structure could not be converted as asked.

    Raised, for example, when ``copy=False`` but a leaf needs a copy, when a tree contains a
    cycle or is too deep, or when trees that should share one structure do not.
    """


class UnsupportedLeafError(ConversionError, TypeError):
    """A leaf whose data cannot be read or has no NumPy form.

    Meta, fake and functorch-wrapped tensors, tensor subclasses that hold no data of their own,
    and dtypes without a NumPy equivalent. It is a [`ConversionError`][] and also a
    ``TypeError``, the type PyTorch itself raises for unsupported dtypes.
    """


class OptionError(TonumpyError, TypeError, ValueError):
    """An argument of a tonumpy function is not one of the values it accepts.

    Raised before any work is done; the message names the function, the parameter, the value
    passed and the values accepted. It is both a ``TypeError`` (``copy=0``, ``axis=1.5``)
    and a ``ValueError`` (``num_items=-1``), so code catching either built-in catches it.
    """


class CaptureError(TonumpyError, ValueError):
    """[`tonumpy.capture`][] was asked for something it cannot do: no module matches."""


class FileFormatError(TonumpyError, ValueError):
    """A file is not one tonumpy reads or writes: missing parts, truncated, corrupt, or unknown.

    Raised by [`tonumpy.load`][], [`tonumpy.io.read`][] and [`tonumpy.io.convert`][] (and the
    ``tonumpy`` command) for a file that is not a regular file, is truncated or damaged (a
    CRC-32 that does not match, a header that does not describe its data, a tampered
    structure), or is of a kind tonumpy does not read; and for a destination tonumpy cannot
    write. The message names the file, and what is wrong with it.

    Examples:
        >>> import os, tempfile, tonumpy
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> with open(path, "w") as f:
        ...     _ = f.write("hello")
        >>> try:
        ...     tonumpy.load(path)
        ... except tonumpy.FileFormatError as exc:
        ...     print("not a file tonumpy reads" in str(exc))
        True
    """


class DestinationExistsError(TonumpyError, FileExistsError):
    """The file or directory to write exists, and was not replaced.

    Raised by [`tonumpy.save`][], [`tonumpy.io.convert`][], ``Accumulator(directory=)`` and
    ``gather(directory=)`` when the destination exists and ``overwrite`` is False (``.option``
    is then ``"overwrite"``), or when it is not something tonumpy replaces (a directory holding
    other files, say). It is a ``FileExistsError``, as before tonumpy named it.

    Examples:
        >>> import os, tempfile, tonumpy
        >>> path = os.path.join(tempfile.mkdtemp(), "out.npz")
        >>> tonumpy.save(path, {"x": 1})
        >>> try:
        ...     tonumpy.save(path, {"x": 2}, overwrite=False)
        ... except tonumpy.DestinationExistsError as exc:
        ...     print(exc.option, isinstance(exc, FileExistsError))
        overwrite True
    """


class MissingDependencyError(TonumpyError, ImportError):  # type: ignore[misc] # both have .path
    """An optional package a feature needs is not installed; the message names the extra.

    Parquet files need ``pyarrow`` (the ``parquet`` extra). It is also an
    ``ImportError``, so code that checks for a missing package catches it.
    """


class UnsafeFileError(TonumpyError, ValueError):
    """A file would run code, or allocate more than it holds, to load: it was refused.

    Nothing in it ran. For a ``torch.save`` file whose pickle needs code to load,
    ``unsafe_load=True`` (``--unsafe-load`` on the command line) unpickles it anyway: only do
    that for files whose origin you trust.
    """


class TonumpyWarning(UserWarning):
    """Base class of every warning tonumpy gives.

    Args:
        message: What was found, where, and how to silence it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UnmatchedPatternWarning(TonumpyWarning):
    """A ``reduce=``/``exclude=`` pattern, or a ``capture`` module pattern, matched nothing.

    One list of patterns may serve several model families, so a pattern that matches nothing
    is not an error; but it is often a typo (``"past_key_value"``) or a key under another
    parent (``"logits"`` when the batches hold ``out.logits``), and then the memory saving
    asked for is silently lost. The message names every such pattern. See what each pattern
    matched with ``Accumulator.matched`` (or [`tonumpy.module_names`][] for ``capture``).

    Examples:
        >>> import warnings, torch, tonumpy
        >>> acc = tonumpy.Accumulator(reduce={"logits": lambda t: t.argmax(-1)})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     acc.append({"out": {"logits": torch.zeros(2, 3)}})
        >>> "the pattern 'logits' matches no leaf of batch 0" in str(caught[0].message)
        True
        >>> with warnings.catch_warnings():  # one list for several model families: silence it
        ...     warnings.simplefilter("ignore", tonumpy.UnmatchedPatternWarning)
        ...     tonumpy.Accumulator(exclude="cache").append({"x": torch.ones(1)})
    """


class UncheckedObjectWarning(TonumpyWarning):
    """An object tonumpy cannot rebuild was too large to search for tensors; it was passed on.

    tonumpy looks for tensors in such an object (breadth first: its attributes, then what they
    hold, and so on) through at most 100,000 objects. An object larger than that is returned
    as it is, with this warning, instead of failing a call that worked while the object was
    small. Keep such objects with ``is_leaf=`` to skip the search (and this warning).
    """
