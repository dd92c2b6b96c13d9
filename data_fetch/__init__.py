"""data_fetch: download the course's public breast ultrasound datasets, once, safely.

    python -m data_fetch list                  # what can be fetched
    python -m data_fetch bus_bra               # into the default data folder
    python -m data_fetch busi --dest ~/data/busi --url https://mirror.example/Dataset_BUSI.zip

    from data_fetch import fetch
    folder = fetch("bus_bra")                  # Path of the unpacked dataset

Each dataset goes to its own folder, `default_data_dir() / <folder>` unless `dest` says otherwise,
and `mtlearn.data.load_dataset(name, root=...)` reads that same folder. A fetch that completed
leaves a marker file there (checksum and file list); fetching again then downloads nothing, unless
files were deleted since or another checksum is asked for. Files deleted since are restored from the
archive, checked against the marker's checksum: the one a user accepted with --hash stays accepted.
Unpacking never replaces a file it did not write (one of the marker's, or of an unpacking cut short)
with other contents: a `dest` that already holds a user's files is refused, naming them. One fetch
of a dataset into a folder at a time: a second one is refused while the first holds its lock file.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from data_fetch.archive import UnsafeArchiveError, WouldReplaceError, extract_zip
from data_fetch.download import (
    RETRIES, DownloadError, FetchError, HashMismatchError, check_hash, check_retries, download_file, file_hash,
    parse_hash,
)
from data_fetch.locking import make_and_lock
from data_fetch.sources import SOURCES, Source, get_source

__all__ = [
    "SOURCES", "DownloadError", "FetchError", "HashMismatchError", "Source", "UnsafeArchiveError",
    "WouldReplaceError", "completion_marker", "dataset_dir", "default_data_dir", "fetch", "missing_files",
]

DATA_ENV = "MTLEARN_DATA"  # environment variable that overrides the default data root


def default_data_dir() -> Path:
    """Where datasets live: $MTLEARN_DATA if set, else the user cache (pooch.os_cache("mtlearn"))."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    import pooch  # only here: it is not needed to merely import data_fetch

    return Path(pooch.os_cache("mtlearn"))


def dataset_dir(name: str) -> Path:
    """Default folder of dataset `name` (a data_fetch name, e.g. "busi_128")."""
    return default_data_dir() / get_source(name).folder


def fetch(
    name: str,
    dest: str | Path | None = None,
    url: str | None = None,
    known_hash: str | None = None,
    progress: bool = True,
    *,
    retries: int = RETRIES,
) -> Path:
    """Download dataset `name` into `dest` (default `dataset_dir(name)`), unpack it, return `dest`.

    `url` and `known_hash` replace the pinned ones (a mirror; a checksum you pinned yourself). Without
    `known_hash`, a folder fetched before is checked against the checksum its last fetch recorded (the
    pinned one, or the one you accepted then). A file already at `dest/<filename>` (say, downloaded by
    hand) is checked and used as it is. `retries`: attempts after the first one when the host fails.
    Raises DownloadError with manual-download instructions when the host fails,
    HashMismatchError when the checksum differs, UnsafeArchiveError for a malicious archive.
    """
    retries = check_retries(retries)  # now, not after the folder was made
    source = get_source(name)
    if isinstance(dest, str) and not dest.strip():  # Path("") is the working folder: the dataset all over it
        raise ValueError("dest is empty; name a folder for the dataset, or leave it out for the default")
    folder = Path(dest).expanduser() if dest is not None else dataset_dir(name)
    url = url or source.url
    parts = urlsplit(url)  # urllib's own error would be "unknown url type"
    if not (parts.scheme in ("http", "https", "ftp") and parts.netloc or parts.scheme == "file" and parts.path):
        raise ValueError(f"url {url!r} is not a web address; give the whole address of the file, starting with "
                         f"https:// (or file:// for a local copy; the pinned one: {source.url})")
    try:
        parts.port  # noqa: B018 (raises on a port that is no number: "127.0.0.1:80a")
        bad_port = False
    except ValueError:
        bad_port = True
    spaced = parts.scheme != "file" and re.search(r"[\x00-\x20\x7f]", url)  # a file:// path may hold spaces
    if bad_port or spaced:  # urllib's InvalidURL, once retried as if the host had failed
        problem = "has a port that is no number from 0 to 65535" if bad_port else "holds a space or a control character"
        raise ValueError(f"url {url!r} {problem}; copy the address again (a space is written %20)")
    parse_hash(known_hash)  # a malformed checksum fails now, not after a long download
    marker = completion_marker(folder, source.name)
    record = _read_marker(marker)
    # quiet: when it no longer holds, _fetch_locked checks again under the lock and says why, once
    if record is not None and _still_complete(record, folder, source, known_hash, quiet=True):
        return folder  # fetched before: nothing to do
    created = not folder.exists()
    # Two fetches into one folder at once wrote one .part file from both ends (then offered a --hash that
    # accepted the spliced file) and unpacked over each other's files: the second one is refused.
    lock = _lock_file(folder, source)
    try:
        holder = make_and_lock(folder, lock)
    except PermissionError as error:  # named after the folder asked for, not the hidden lock file
        refused = PermissionError(f"cannot write to {folder}: no permission to create files there; pass dest= a "
                                  f"folder you can write to, or set {DATA_ENV} to one")
        refused.errno = error.errno  # (given as arguments, errno and strerror would start the message "[Errno 13]")
        raise refused from None
    if holder is not None:
        raise FetchError(f"another data_fetch ({holder}) is fetching {source.name} into {folder}; wait for it to "
                         f"finish, then run this again (it will find the dataset ready); if none is running (one "
                         f"killed on another machine, or on Windows), delete {lock}")
    try:
        return _fetch_locked(source, folder, url, parts.scheme, known_hash, progress, retries)
    finally:
        lock.unlink(missing_ok=True)
        # An empty folder left by a failed download would look downloaded: mtlearn.data.load_dataset
        # would then report a missing file instead of "not downloaded" and the command that fetches it.
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _fetch_locked(source: Source, folder: Path, url: str, scheme: str, known_hash: str | None, progress: bool,
                  retries: int) -> Path:
    """fetch's work, under its lock: download, verify, unpack, write the marker."""
    given_hash = known_hash
    target = folder / source.filename
    marker = completion_marker(folder, source.name)
    record = _read_marker(marker)  # again, under the lock: another fetch may have finished since fetch read it
    if record is not None and _still_complete(record, folder, source, known_hash):
        return folder
    # (a stale marker stays until the archive is verified below: a wrong --hash must not undo a good fetch)
    recorded = record is not None and known_hash is None and record.get("known_hash") is not None
    if recorded:
        # Restoring deleted files: the archive must be the one they came from. After `--hash` accepted a
        # re-packed archive, the pinned checksum would refuse it, and with it every repair command printed.
        known_hash = record["known_hash"]
    known_hash = known_hash or source.known_hash

    if target.exists():  # an earlier run stopped before unpacking, or the user put the file here
        try:
            check_hash(target, known_hash)
        except HashMismatchError as error:
            _refuse_a_wrong_given_hash(target, given_hash, source, record, error)
            advice = mismatch_advice(source, known_hash, folder, error, recorded)
            raise HashMismatchError(f"{error}; delete {target} and fetch again.\n{advice}", error.actual) from None
    else:
        try:
            download_file(url, target, known_hash, progress=progress, retries=retries)
            if known_hash is None and source.extract and not zipfile.is_zipfile(target):
                # no checksum caught it: a host's error or login page, saved under the archive's name,
                # would look downloaded to the loaders and send the user round in circles
                kept = target.with_name(target.name + ".not-a-zip")
                os.replace(target, kept)
                start = _first_bytes(kept)
                if start.startswith(ZIP_START):  # a zip's beginning without its end: cut short, not a web page
                    raise DownloadError(f"what the host sent begins like a zip archive but is cut short (the "
                                        f"transfer stopped early?); it was kept as {kept}: delete it and run again")
                raise DownloadError(f"what the host sent is not a zip archive but begins {start!r}, an error or "
                                    f"login page?; it was kept as {kept}, not as {target.name}")
        except DownloadError as error:
            if scheme == "file":  # a copy on this machine: a browser or curl would not do better
                raise DownloadError(local_copy_problem(source, url, folder, error)) from error
            raise DownloadError(manual_instructions(source, url, known_hash, folder, reason=str(error))) from error
        except HashMismatchError as error:
            if error.kept is not None:
                _refuse_a_wrong_given_hash(error.kept, given_hash, source, record, error)
            advice = mismatch_advice(source, known_hash, folder, error, recorded, local=scheme == "file")
            raise HashMismatchError(f"{error}.\n{advice}", error.actual, error.kept) from None
    # Files already there are replaced only if this dataset's unpacking wrote them: the marker's, or any after
    # an unpacking cut short (its checks had passed, so what differs now is its own half-written work).
    unpacking = folder / f".{source.name}.unpacking"
    listed = record.get("files") if record is not None else None
    replaceable = None if unpacking.exists() else listed if isinstance(listed, list) else []

    def started() -> None:
        # The archive passed every check: from here the folder's files change, so the marker of an earlier fetch
        # goes first (an unpacking cut short leaves no marker over half-written files: the loaders say to fetch),
        # and the record of this unpacking stays until the new marker is written. A refusal keeps the old marker.
        marker.unlink(missing_ok=True)
        unpacking.touch()

    if source.extract:  # the files that record this fetch are its own: a member named so is refused
        own = [marker.name, marker.name + ".tmp", unpacking.name, _lock_file(folder, source).name,
               *(source.filename + suffix for suffix in (".part", ".mismatch", ".not-a-zip"))]
        files = extract_zip(target, folder, replaceable=replaceable, started=started, reserved=own)
    else:  # a single file, checked and in place: the marker is replaced below, atomically
        files = [source.filename]
    files = [name for name in files if not name.endswith("/")]  # directories are implied by their files
    if known_hash is None:
        # Only after unpacking: a host's error page saved under the archive's name must not be pinned.
        digest = file_hash(target, "sha256")
        known_hash = f"sha256:{digest}"
        print(
            f"{source.name}: no checksum is published for {source.filename}; its sha256 is {digest}.\n"
            f"Pin it so that later downloads are checked: python -m data_fetch {source.name} --dest \"{folder}\" "
            f"--hash {known_hash}\n"
            "(or set known_hash for this source in data_fetch/sources.py)"
        )
    # Written last: a folder without the marker is not finished, whatever else it holds.
    record = {"name": source.name, "url": url, "known_hash": known_hash, "files": files}
    partial = marker.with_name(marker.name + ".tmp")  # then renamed: a full disk leaves no half-written marker
    try:
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, marker)
    finally:
        partial.unlink(missing_ok=True)
    unpacking.unlink(missing_ok=True)
    return folder


def _refuse_a_wrong_given_hash(path: Path, given_hash: str | None, source: Source, record: dict | None,
                               error: HashMismatchError) -> None:
    """Raise HashMismatchError saying the given --hash looks wrong when the file at `path` matches the pinned
    checksum or the one the last fetch recorded: the usual advice (delete it, fetch again) would throw a good
    archive away and fail again the same way. Returns when there is no such checksum, or none matches."""
    if given_hash is None:
        return
    checksums = {"the pinned checksum": source.known_hash,
                 "the checksum the last fetch recorded": record and record.get("known_hash")}
    for which, checksum in checksums.items():
        if checksum is None or parse_hash(checksum) == parse_hash(given_hash):
            continue
        try:
            check_hash(path, checksum)
        except HashMismatchError:
            continue
        raise HashMismatchError(
            f"{path} does not match the --hash you gave ({given_hash}) but matches {which} ({checksum}): "
            f"the file is good and the --hash looks wrong. Run again without --hash (or with --hash {checksum})"
            + (f": it uses {path.name}, without downloading it again" if path.name != source.filename else ""),
            error.actual, error.kept)


def completion_marker(folder: str | Path, name: str) -> Path:
    """The file a finished fetch of dataset `name` leaves in `folder` (its hash and file list)."""
    return Path(folder) / f".{get_source(name).name}.complete"


def _lock_file(folder: Path, source: Source) -> Path:
    """The lock a fetch of `source` holds in `folder` (one per dataset: resolutions sharing a folder share no file)."""
    return folder / f".{source.name}.lock"


def _read_marker(marker: Path) -> dict | None:
    """The record a completed fetch left in `marker`; None if there is none, or it cannot be read or holds
    a checksum that cannot be read (cut short, edited by hand): then the cheap part, checking the archive
    and unpacking it, is done again rather than trusted."""
    try:
        record = json.loads(marker.read_text())
        parse_hash(record.get("known_hash"))
    except (OSError, ValueError, AttributeError, TypeError):  # AttributeError, TypeError: not a dict of strings
        return None
    return record


def _still_complete(record: dict, folder: Path, source: Source, known_hash: str | None, quiet: bool = False) -> bool:
    """Whether a fetch that once completed (its marker's `record`) still holds: no other checksum asked for,
    no file deleted since. Prints why not, unless `quiet`."""
    recorded = parse_hash(record.get("known_hash"))
    # Compared as read: "md5:ABC..." and a bare "abc..." are the same checksum, not a reason to check again.
    if known_hash is not None and recorded is not None and parse_hash(known_hash) != recorded:
        if not quiet:
            print(f"{source.name}: a different checksum than the one of the last fetch was given; checking again")
        return False
    missing = _missing(record, folder, source)
    if missing and not quiet:
        print(f"{source.name}: {len(missing)} file(s) of the last fetch are missing (e.g. {missing[0]}); "
              "fetching again")
    return not missing


def _missing(record: dict, folder: Path, source: Source) -> list[str]:
    """The files a completed fetch (its marker's `record`) put in `folder` that are gone since."""
    # markers written before file lists were recorded: trust an archive's, check a plain file
    files = record.get("files", [] if source.extract else [source.filename])
    return [name for name in files if not (folder / name).exists()]


def missing_files(folder: str | Path, name: str) -> list[str]:
    """Files the completed fetch of dataset `name` unpacked into `folder` that have been deleted or
    moved since (its completion marker lists them); [] when no fetch completed there."""
    folder = Path(folder)
    record = _read_marker(completion_marker(folder, name))
    return [] if record is None else _missing(record, folder, get_source(name))


def mismatch_advice(
    source: Source, known_hash: str, folder: Path, error: HashMismatchError, recorded: bool = False,
    local: bool = False,
) -> str:
    """What a checksum mismatch of `source` likely means, and how to accept a file the user checked.

    `recorded`: `known_hash` is the one the last fetch into `folder` recorded, not one given or pinned
    (the checksum the user accepted then, or computed where none is pinned).
    `local`: the file was copied from this machine (a file:// address), so no transfer broke it.
    """
    pinned = parse_hash(known_hash) == parse_hash(source.known_hash)
    start = ZIP_START
    if error.kept is not None and (source.extract or source.filename.endswith(".npz")):
        first = _first_bytes(error.kept)  # read once; an .npz is a zip too, but only markup (a web page saved
        if source.extract or first.lstrip()[:1] == b"<":  # in its place) says more than a broken transfer
            start = first
    if not start.startswith(b"PK"):  # not a zip at all: retrying gets the same page, and accepting its checksum
        # would only fail at unpacking
        copy_url = f"file:///path/to/{source.filename}"
        return (f"The file is not a zip archive but begins {start!r}: the host sent an error or login page, not "
                f"{source.filename}. Download {source.filename} in a browser (signed in where the host asks) and "
                f"run `python -m data_fetch {source.name} --dest \"{folder}\" --url {copy_url}`.")
    if pinned and not source.hash_is_official:
        cause = (f"The checksum of {source.name} was pinned by another project, not published by its authors: if "
                 "the host re-packed the archive, every download fails this way, so check the file rather than retry.")
    elif recorded and not pinned:
        cause = (f"{known_hash} is the checksum of the archive the last fetch into {folder} unpacked (recorded in "
                 f"{completion_marker(folder, source.name).name}); if that archive came from a mirror, fetch from "
                 "it again with --url.")
    elif error.kept is not None and local:
        cause = ("The local copy given with --url is not the expected file (a copy read from this machine does not "
                 "break in transit, so running again gives the same bytes); point --url at the right file.")
    elif error.kept is not None:
        cause = "A broken transfer is the usual cause: run again to retry."
    else:
        cause = ""  # a file put there by hand: the caller says to delete it
    accept = f"python -m data_fetch {source.name} --dest \"{folder}\" --hash {error.actual}"
    if error.kept is not None:  # download_file takes the kept copy once it matches the checksum asked for
        accept += f" (it uses the kept {error.kept.name}, without downloading it again)"
    return (cause + "\n" if cause else "") + (
        f"If you checked the file (it unpacks, the images look right) and want to use it: {accept}"
    )


ZIP_START = b"PK\x03\x04"  # a zip archive's first local file header


def _first_bytes(path: Path, count: int = 40) -> bytes:
    """The first `count` bytes of `path` (b"" when it cannot be read): what a host sent, to name it."""
    try:
        with open(path, "rb") as file:
            return file.read(count)
    except OSError:
        return b""


def local_copy_problem(source: Source, url: str, folder: Path, error: DownloadError) -> str:
    """Why the local copy `url` (file://) could not be read, and how to point data_fetch at the right one."""
    parts = urlsplit(url)
    path = Path(url2pathname(parts.path))
    if path.is_dir():
        problem = f"{path} is a folder; give the path of the file itself, e.g. {(path / source.filename).as_uri()}"
    elif not path.exists():
        problem = f"there is no such file: {path}; check the path (the URL holds the file's absolute path)"
        if parts.fragment:  # "file:///Course #1/x.zip": the path ends at the "#"
            meant = Path(url2pathname(parts.path) + "#" + parts.fragment).as_uri()
            problem += f"; in a URL '#' ends the path: write it %23, e.g. {meant}"
    else:
        problem = str(error)  # say, no permission to read it
    return (
        f"could not read {source.name} from {url}: {problem}.\n"
        f"Or copy the file to {folder / source.filename} and run `python -m data_fetch {source.name} --dest "
        f"\"{folder}\"`: it checks and unpacks the file without downloading"
    )


def manual_instructions(source: Source, url: str, known_hash: str | None, folder: Path, reason: str = "") -> str:
    """How to download `source` by hand and let data_fetch check and unpack it."""
    expected = parse_hash(known_hash)
    check = (
        f"its {expected[0]} must be {expected[1]} (`{expected[0]}sum {source.filename}`)"
        if expected else "no checksum is published; data_fetch prints the sha256 so you can pin it"
    )
    mirror = (  # the same host is likely to fail the curl too (not said of a mirror the user chose)
        f"     (this host is often unreliable: from a mirror, run `python -m data_fetch {source.name} "
        f"--dest \"{folder}\" --url <mirror URL>`; the file is checked against the same checksum)\n"
        if source.host_unreliable and url == source.url else ""
    )
    return (
        f"could not download {source.name} from {url}" + (f" ({reason})" if reason else "") + ".\n"
        "Download it by hand instead:\n"
        f"  1. open {url} in a browser, or run: curl -L --create-dirs -o \"{folder / source.filename}\" \"{url}\"\n"
        f"{mirror}"
        f"  2. check the file: {check}\n"
        f"  3. put it at {folder / source.filename} (make the folder if it is not there)\n"
        f"  4. run `python -m data_fetch {source.name} --dest \"{folder}\"` again: it checks and unpacks the file "
        "without downloading"
    )
