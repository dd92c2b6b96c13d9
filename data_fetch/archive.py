"""Unpack a zip archive safely: refuse any member that would land outside the target folder.

A member named `../../.bashrc` or `/etc/passwd` ("zip slip") would write outside the dataset
folder. Every name is checked before a single byte is written, so a bad archive leaves nothing;
symbolic links, and files that other members need as their folder, are refused the same way.
Some hosts (Mendeley Data, for BUS-UCLM) wrap the dataset's own zip inside the download: zips
found in the archive are unpacked next to themselves, one level deep, and their names are checked
too, before the outer archive is unpacked. The `._*` files a Mac adds under `__MACOSX/` are not
zips, whatever their names end with, and are left as they are. An archive that would not fit on
the disk (its members' sizes, nested zips included, against the free space) is refused up front, and
so is one that would replace a file already in the folder with other contents, unless the caller
names it as replaceable (a file an earlier unpacking of the same dataset wrote): `--dest` may point
at a folder that holds a user's own files.
"""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path, PurePosixPath

from data_fetch.download import FetchError


# stored, deflated, bzip2, lzma: what zipfile reads (bzip2 and lzma only when Python was built with them)
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


class UnsafeArchiveError(FetchError, ValueError):
    """An archive member would be written outside the target folder or over the archive itself, or is a
    link, or is a file where other members need a folder."""


class WouldReplaceError(FetchError, FileExistsError):
    """Unpacking would replace files already in the target folder that hold something else."""


def extract_zip(archive: Path, target: Path, nested: bool = True, replaceable: Collection[str] | None = (),
                started: Callable[[], None] | None = None, reserved: Collection[str] = ()) -> list[str]:
    """Unpack `archive` into `target` (created if needed); return the member names, relative to
    `target` (those of nested zips included).

    replaceable: the files in `target` (names relative to it) that may be replaced although their
    contents differ from the archive's, e.g. those an earlier unpacking of the same archive wrote;
    None: any file. A file the same as its member (size and CRC-32) is always replaced: nothing is lost.
    started: called once every check has passed, before the first byte is written.
    reserved: names in `target` no member may write (data_fetch's own marker and lock files).

    Raises UnsafeArchiveError, before extracting anything, if a member name (of the archive or of a
    zip inside it) is absolute, climbs out of its folder with "..", or would overwrite its own
    archive, a zip inside it or a reserved name, or if a member of the archive is a symbolic link or
    a file that other members need as their folder; WouldReplaceError, before extracting anything,
    if members would replace other files; FetchError if the archive, or a zip inside it, cannot be read.
    """
    archive, target = Path(archive), Path(target)
    inner_zips = []
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                _check_member(name, archive, target)
            _check_kinds(zf.infolist(), archive)
            inner_zips = [name for name in names if _is_wrapped_zip(name)] if nested else []
            # each inner zip is checked as it is now and unpacked later: one replaced in between would not be
            # the zip checked; and an archive must not write the files that say how far its fetch got
            # (compared without case: on macOS and Windows .BUS_BRA.COMPLETE is the marker)
            protected = {_where(target / name): f"{name}, another zip in {archive.name}, before {name} is unpacked"
                         for name in inner_zips}
            protected.update({_where(target / name): "a file of data_fetch's own" for name in reserved})
            zips = set(inner_zips)
            for name in names:
                what = protected.get(_where(target / name)) if name not in zips else None
                if what is not None:
                    raise UnsafeArchiveError(f"refusing to unpack {archive.name}: member {name!r} would replace "
                                             f"{what}; the archive is damaged or malicious, nothing was extracted")
            needed = sum(info.file_size for info in zf.infolist())
            clashes = _clashes(zf.infolist(), target, None, replaceable)
            for name in inner_zips:
                size, inner_clashes = _check_inner_zip(zf, name, archive, target, replaceable, protected)
                needed, clashes = needed + size, clashes + inner_clashes
            if clashes:
                shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
                raise WouldReplaceError(
                    f"refusing to unpack {archive.name} into {target}: it would replace {len(clashes)} file(s) "
                    f"there that hold something else ({shown}); nothing was extracted. Fetch into an empty "
                    "folder or the default one (leave out --dest), or move those files away first")
            _check_free_space(needed, archive, target)
            if started is not None:
                started()
            target.mkdir(parents=True, exist_ok=True)
            zf.extractall(target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise FetchError(f"{archive} is not a readable zip archive ({error}); delete it and fetch again") from None
    for name in inner_zips:
        inner = target / name
        # where it was written: a name with backslashes (a Windows tool's) is one file in `target` on POSIX
        parent = PurePosixPath(inner.parent.relative_to(target).as_posix())
        unpacked = extract_zip(inner, inner.parent, nested=False, replaceable=None)  # checked with the outer one
        names += [str(parent / member) for member in unpacked]
    return names


def _clashes(infos: list[zipfile.ZipInfo], target: Path, parent: PurePosixPath | None,
             replaceable: Collection[str] | None) -> list[str]:
    """The names of the file members that would replace a file in `target` holding something else, unless
    `replaceable` lists them; named as extract_zip returns them (under `parent` for a nested zip's)."""
    if replaceable is None:
        return []
    allowed, found = set(replaceable), []
    for info in infos:
        name = info.filename if parent is None else str(parent / info.filename)
        path = target / info.filename  # as zipfile writes it: a name with backslashes is one file on POSIX
        if info.is_dir() or name in allowed or not path.is_file():
            continue
        if path.stat().st_size != info.file_size or _crc32(path) != info.CRC:
            found.append(name)
    return found


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _is_wrapped_zip(name: str) -> bool:
    """A zip to unpack in turn: `.zip` at the end, and not a Mac's resource-fork debris
    (`__MACOSX/dataset/._BUS-UCLM.zip` is a few hundred bytes of metadata, not an archive)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.suffix.lower() == ".zip" and "__MACOSX" not in path.parts and not path.name.startswith("._")


def _check_free_space(needed: int, archive: Path, target: Path) -> None:
    """Refuse to start unpacking what the disk under `target` cannot hold: a full disk halfway
    through would leave part of the dataset, and possibly no room for anything else."""
    folder = target
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists: same disk
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FetchError(f"unpacking {archive.name} needs {_size(needed)} and {folder} has {_size(free)} free; "
                         "nothing was extracted. Free some space, or fetch into a folder on another disk "
                         "(--dest, or $MTLEARN_DATA)")


def _size(count: int) -> str:
    """Bytes for people: '850.0 MB', '2.31 GB'."""
    return f"{count / 1e6:.1f} MB" if count < 1e9 else f"{count / 1e9:.2f} GB"


def _where(path: Path) -> str:
    """Where `path` is on disk, as one text for every spelling (.., letter case) of it."""
    return str(path.resolve()).casefold()


def _check_inner_zip(zf: zipfile.ZipFile, name: str, archive: Path, target: Path,
                     replaceable: Collection[str] | None, protected: Mapping[str, str]) -> tuple[int, list[str]]:
    """Check the member names of the zip `name` inside `zf` where it will be unpacked, without
    writing it out first (ZipFile reads its directory from the compressed stream); return the
    bytes its members will take once unpacked, and those that would replace other files (`_clashes`).
    protected: the places (`_where`) no member may write -> what they are, for the message."""
    inner_path = target / name
    try:
        with zf.open(name) as stream, zipfile.ZipFile(stream) as inner:
            for member in inner.namelist():
                _check_member(member, inner_path, inner_path.parent, within=archive.name)
                if (inner_path.parent / member.replace("\\", "/")).resolve() == archive.resolve():
                    # unpacked after the outer archive was read: it would replace the verified download
                    raise UnsafeArchiveError(
                        f"refusing to unpack {inner_path.name} (inside {archive.name}): member {member!r} would "
                        f"overwrite {archive.name}, the archive it came in; the archive is damaged or malicious, "
                        "nothing was extracted")
                what = protected.get(_where(inner_path.parent / member.replace("\\", "/")))
                if what is not None:
                    raise UnsafeArchiveError(
                        f"refusing to unpack {archive.name}: member {member!r} of {name} (a zip in it) would replace "
                        f"{what}; the archive is damaged or malicious, nothing was extracted")
            _check_kinds(inner.infolist(), inner_path, within=archive.name)
            parent = PurePosixPath(inner_path.parent.relative_to(target).as_posix())
            return (sum(info.file_size for info in inner.infolist()),
                    _clashes(inner.infolist(), inner_path.parent, parent, replaceable))
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise FetchError(
            f"{name} inside {archive} is not a readable zip archive ({error}); nothing was extracted. Delete "
            f"{archive.name} and fetch again; if it happens again, unpack it by hand"
        ) from None


def _check_kinds(infos: list[zipfile.ZipInfo], archive: Path, within: str | None = None) -> None:
    """Refuse a symbolic-link member, and a member that is a file and also the folder of another
    (`archive` itself inside the archive `within`, if given).

    zipfile writes a link as a small file holding its target's path, so a later member "under" it
    would fail halfway through unpacking (NotADirectoryError), with part of the archive written.
    """
    label = archive.name + (f" (inside {within})" if within else "")
    folders = {str(parent) for info in infos for parent in PurePosixPath(info.filename.replace("\\", "/")).parents}
    folders |= {info.filename.replace("\\", "/").rstrip("/") for info in infos if info.is_dir()}  # "x/" beside "x"
    for info in infos:
        # what Python's zipfile cannot read failed halfway through unpacking (NotImplementedError, RuntimeError)
        if info.flag_bits & 0x1:
            raise FetchError(f"cannot unpack {label}: member {info.filename!r} is encrypted (password-protected), "
                             "which the dataset's archive is not; nothing was extracted. Download it again, or "
                             "unpack it by hand and point the loader at the folder")
        if info.compress_type not in READABLE_METHODS:
            raise FetchError(f"cannot unpack {label}: member {info.filename!r} uses compression method "
                             f"{info.compress_type} (e.g. Deflate64, written by Windows for large zips), which "
                             "Python's zipfile cannot read; nothing was extracted. Unpack it with 7-Zip or unzip and "
                             "point the loader at the folder, or download the original archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"refusing to unpack {label}: member {info.filename!r} is a symbolic "
                                     "link; the archive is damaged or not the dataset's, nothing was extracted")
        name = info.filename.replace("\\", "/").rstrip("/")
        if not info.is_dir() and name in folders:
            raise UnsafeArchiveError(f"refusing to unpack {label}: member {info.filename!r} is a file and "
                                     "also the folder of other members; the archive is damaged, nothing was extracted")


def _check_member(name: str, archive: Path, target: Path, within: str | None = None) -> None:
    """Refuse a member `name` of `archive` (itself inside the archive `within`, if given) that would be
    written outside `target` or over `archive`."""
    label = archive.name + (f" (inside {within})" if within else "")
    path = PurePosixPath(name.replace("\\", "/"))
    drive_letter = re.match(r"^[A-Za-z]:", name) is not None
    escapes = not (target / path).resolve().is_relative_to(target.resolve())
    if path.is_absolute() or drive_letter or ".." in path.parts or escapes:
        raise UnsafeArchiveError(
            f"refusing to unpack {label}: member {name!r} would be written outside {target} "
            "(absolute path or '..'); the archive is damaged or malicious, nothing was extracted"
        )
    if (target / path).resolve() == archive.resolve():
        raise UnsafeArchiveError(
            f"refusing to unpack {label}: member {name!r} would overwrite the archive itself while it is "
            f"being read; unpack it by hand into another folder, then point the loader at that folder"
        )
