"""The output folder of a dataset preparer: checks before anything is read, and files written only at the end.

:func:`check_output` refuses an output that is a file, an existing datalist or ``dataset.json`` without ``--force``,
overwriting a file of a source, an output inside a source, (for preparers that write images or masks) a source
inside the output, and an output that cannot be created or written (read-only, no permission, a parent that is a
file); a write that fails later all the same (a full disk) is reported naming the file.
:class:`GeneratedFolders` collects generated files (tiles, masks) in a hidden staging folder next to their destination
and moves them into place only when the whole preparation succeeded, so a failed run leaves the output as it was.
The datalist is written last (atomically), so a folder with a datalist always holds all its files.

:func:`write_prepared` also writes ``dataset.json``, a config override file with ``dataset_dir`` and the dataset's
``settings`` (its classes and how its masks turn into classes): training merges it after ``configs/train.json``, so
nothing the dataset needs is typed by the user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from bundle.data.datalist import DATALIST_FILENAME, absolute_path, write_datalist
from bundle.errors import BundleInputError

__all__ = [
    "DATASET_FILENAME",
    "GeneratedFolders",
    "check_output",
    "check_source",
    "check_writable",
    "is_inside",
    "write_prepared",
]

DATASET_FILENAME = "dataset.json"


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_source(source: str | os.PathLike, label: str) -> str:
    """``source`` as an absolute path; :class:`BundleInputError` unless it is an existing folder."""
    source = absolute_path(source)
    if not os.path.isdir(source):
        what = "is not a folder" if os.path.exists(source) else "does not exist"
        raise BundleInputError(f"{label} source {source} {what}")
    return source


def _cannot_write(error: OSError, path: str) -> BundleInputError:
    """An ``OSError`` of a write (full disk, no permission) as one line naming the file or folder meant."""
    return BundleInputError(f"cannot write {path}: {error.strerror or type(error).__name__}")


def check_writable(output: str) -> None:
    """Refuse an ``output`` folder that could not be created or written, before anything is read or written."""
    folder = output
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise BundleInputError(f"output {output} cannot be created: {folder} is a file, not a folder")
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    reason = "is on a read-only file system" if read_only else "is not writable (no permission)"
    if folder == output:
        raise BundleInputError(f"output {output} {reason}; choose a folder you can write to")
    raise BundleInputError(f"output {output} cannot be created: its parent {folder} {reason}")


def check_output(
    sources: Sequence[str],
    output: str | os.PathLike,
    label: str,
    *,
    force: bool,
    writes_files: bool = False,
) -> str:
    """Check that ``output/datalist.json`` and ``output/dataset.json`` may be written; return the absolute output
    folder.

    ``label`` names the dataset in messages ("GlaS source ..."). The output is never inside a source (nothing is
    written into a source); with ``writes_files`` (tiles, masks) no source may be inside the output either.
    """
    output = absolute_path(output)
    targets = [os.path.join(output, name) for name in (DATALIST_FILENAME, DATASET_FILENAME)]
    if os.path.exists(output) and not os.path.isdir(output):
        raise BundleInputError(f"output {output} exists and is not a folder")
    for target in targets:
        if os.path.isdir(target):
            raise BundleInputError(f"{target} is a folder; cannot write the {os.path.basename(target)} there")
    for source in sources:
        if is_inside(output, source) or (writes_files and is_inside(source, output)):
            raise BundleInputError(
                f"output {output} overlaps the {label} source {source}; choose an output folder outside the source "
                "(files are written there and the source is never modified)"
            )
    for target in targets:
        if not os.path.exists(target):
            continue
        for source in sources:
            if is_inside(target, source):
                raise BundleInputError(f"refusing to overwrite {target}: it is a file of the {label} source {source}")
        if not force:
            raise BundleInputError(f"{target} already exists; pass --force to overwrite it")
    check_writable(output)
    return output


class GeneratedFolders:
    """Sub-folders of ``output`` (such as ``tiles``, ``masks``) filled in a staging folder, swapped in at the end.

    Use as a context manager: :meth:`staging` gives where to write ``name`` now, :meth:`final` where it will be.
    On a clean exit each staged folder replaces ``output/name`` (an older one is removed); on an exception the
    staging folder is deleted and ``output`` is left as it was (or removed again if this created it).
    """

    def __init__(self, output: str, names: Sequence[str]) -> None:
        self.output = output
        self.names = tuple(names)
        self._staging: str | None = None
        self._created_output = False

    def __enter__(self) -> GeneratedFolders:
        self._created_output = not os.path.exists(self.output)
        try:
            os.makedirs(self.output, exist_ok=True)
            self._staging = tempfile.mkdtemp(prefix=".prepare-", dir=self.output)
        except OSError as error:
            if self._created_output and os.path.isdir(self.output) and not os.listdir(self.output):
                os.rmdir(self.output)
            raise _cannot_write(error, self.output) from error
        return self

    def staging(self, name: str) -> str:
        if self._staging is None or name not in self.names:
            raise RuntimeError(f"{name!r} is not a generated folder of this context: {self.names}")
        return os.path.join(self._staging, name)

    def final(self, name: str) -> str:
        return os.path.join(self.output, name)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        staging, self._staging = self._staging, None
        try:
            if exc_type is None:
                for name in self.names:
                    staged, final = os.path.join(staging, name), self.final(name)
                    if os.path.lexists(final):
                        if os.path.isdir(final) and not os.path.islink(final):
                            shutil.rmtree(final)
                        else:
                            os.remove(final)
                    if os.path.exists(staged):
                        os.replace(staged, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if exc_type is not None and self._created_output and not os.listdir(self.output):
                os.rmdir(self.output)


def write_prepared(datalist: dict[str, Any], output: str) -> str:
    """Move ``datalist["settings"]`` into ``output/dataset.json`` (with ``dataset_dir``), then write the rest to
    ``output/datalist.json`` (creating ``output``); return the datalist's path. ``datalist`` is left as written."""
    settings = datalist.pop("settings", {})
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as error:
        raise _cannot_write(error, output) from error
    written = ""
    for content, name in (({"dataset_dir": output, **settings}, DATASET_FILENAME), (datalist, DATALIST_FILENAME)):
        try:
            written = write_datalist(content, os.path.join(output, name))
        except OSError as error:
            raise _cannot_write(error, os.path.join(output, name)) from error
    return written
