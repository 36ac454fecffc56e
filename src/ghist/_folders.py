"""Writing a folder ghist owns (a saved model) all at once, replacing only an earlier one of ghist's own; and a file.

A folder is written beside its destination under a unique temporary name, then swapped in by renames: the old one
is moved into a unique temporary folder, the new one renamed into place, and only then the old one removed. Nothing
beside the destination is touched (every temporary name comes from :mod:`tempfile` and is cleaned up), and a folder
that does not carry the caller's marker (e.g. a user's notes) is never replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class NotOurFolderError(FileExistsError):
    """The destination exists and is not a folder ghist wrote (or holds files ghist did not write there)."""


def check_replaceable(
    dest: str | os.PathLike,
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool],
    own_names: Collection[str] | None = None,
    what: str = "folder",
) -> None:
    """Refuse, before any work, a destination that :func:`replace_folder` would not replace.

    Parameters
    ----------
    dest
        The destination folder.
    overwrite
        Whether an existing folder of ours may be replaced.
    is_ours
        Whether an existing folder carries the caller's marker (e.g. a ``model.json`` naming ghist's format).
    own_names
        The names the caller writes into such a folder; anything else found in it is the user's and makes the
        folder irreplaceable (``None``: anything goes).
    what
        How messages name the folder's kind, e.g. ``"ghist model"``.

    Raises
    ------
    FileExistsError
        ``dest`` exists and ``overwrite`` is false.
    NotOurFolderError
        ``dest`` exists but is not a folder, lacks the marker, or holds names not in ``own_names``.

    """
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{str(dest)!r} already exists; pass `overwrite=True` to replace it.")
    if dest.is_symlink() or not dest.is_dir():
        raise NotOurFolderError(f"{str(dest)!r} is not a {what} folder (a file or a link); not replacing it.")
    if not is_ours(dest):
        raise NotOurFolderError(
            f"{str(dest)!r} exists and is not a {what} folder; `overwrite=True` replaces only an earlier {what}. "
            "Choose another path, or move it away yourself."
        )
    if own_names is not None:
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in own_names)
        if foreign:
            raise NotOurFolderError(
                f"{str(dest)!r} is a {what} folder but also holds {foreign[:5]}, which a {what} does not: not "
                "replacing it (that would delete them). Move them out, or choose another path."
            )


def replace_folder(
    dest: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool],
    own_names: Collection[str] | None = None,
    what: str = "folder",
) -> None:
    """Write a folder with ``write(tmp)`` beside ``dest`` and swap it in; an existing one only if it is ours.

    The arguments are those of :func:`check_replaceable` (checked first, then again right before the swap), and
    ``write``, which fills the empty temporary folder it is given. An interruption leaves ``dest`` as it was, or
    (between the two renames) the old folder inside a ``.<name>.*.old`` folder beside it.

    Examples
    --------
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> ours = lambda p: (p / "marker.json").is_file()
    >>> replace_folder(root / "out", lambda tmp: (tmp / "marker.json").write_text("{}"), overwrite=False, is_ours=ours)
    >>> sorted(p.name for p in root.iterdir())
    ['out']

    """
    dest = Path(dest)
    check_replaceable(dest, overwrite=overwrite, is_ours=is_ours, own_names=own_names, what=what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".new", dir=dest.parent))
    old: Path | None = None
    try:
        write(new)
        if dest.exists() or dest.is_symlink():
            # again: the destination may have changed while `write` ran
            check_replaceable(dest, overwrite=overwrite, is_ours=is_ours, own_names=own_names, what=what)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(new, dest)
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
        if old is not None:
            if (old / dest.name).exists() and not dest.exists():
                os.replace(old / dest.name, dest)  # the new folder did not make it: put the old one back
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` (flushed to disk) when the block succeeds.

    A crash or an error leaves ``path`` as it was (never half-written) and removes the temporary file. The result gets
    the usual permissions (``mkstemp`` makes files private).
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
