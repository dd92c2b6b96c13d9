"""Unpack a zip archive safely: refuse any member that would land outside the target folder.

A member named `../../.bashrc` or `/etc/passwd` ("zip slip") would write outside the dataset
folder. Every name is checked before a single byte is written, so a bad archive leaves nothing.
Some hosts (Mendeley Data, for BUS-UCLM) wrap the dataset's own zip inside the download: zips
found in the archive are unpacked next to themselves, one level deep, with the same checks.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from data_fetch.download import FetchError


class UnsafeArchiveError(FetchError, ValueError):
    """An archive member would be written outside the target folder, or over the archive itself."""


def extract_zip(archive: Path, target: Path, nested: bool = True) -> list[str]:
    """Unpack `archive` into `target` (created if needed); return the member names, relative to
    `target` (those of nested zips included).

    Raises UnsafeArchiveError, before extracting anything, if a member name is absolute, climbs
    out of `target` with "..", or would overwrite the archive itself; FetchError if the archive
    cannot be read.
    """
    archive, target = Path(archive), Path(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                _check_member(name, archive, target)
            target.mkdir(parents=True, exist_ok=True)
            zf.extractall(target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise FetchError(f"{archive} is not a readable zip archive ({error}); delete it and fetch again") from None
    if nested:
        for name in list(names):
            if name.lower().endswith(".zip"):
                inner = target / name
                parent = PurePosixPath(name.replace("\\", "/")).parent
                names += [str(parent / member) for member in extract_zip(inner, inner.parent, nested=False)]
    return names


def _check_member(name: str, archive: Path, target: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    drive_letter = re.match(r"^[A-Za-z]:", name) is not None
    escapes = not (target / path).resolve().is_relative_to(target.resolve())
    if path.is_absolute() or drive_letter or ".." in path.parts or escapes:
        raise UnsafeArchiveError(
            f"refusing to unpack {archive.name}: member {name!r} would be written outside {target} "
            "(absolute path or '..'); the archive is damaged or malicious, nothing was extracted"
        )
    if (target / path).resolve() == archive.resolve():
        raise UnsafeArchiveError(
            f"refusing to unpack {archive.name}: member {name!r} would overwrite the archive itself while it is "
            f"being read; unpack it by hand into another folder, then point the loader at that folder"
        )
