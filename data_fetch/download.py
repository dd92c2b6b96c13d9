"""Download one file safely: resume, retry, verify, and only then put it in place.

How, and why:

- bytes go to `<file>.part`; an interrupted download leaves that file behind and the next attempt
  asks the server for the rest (HTTP Range), starting 4 KiB early: bytes that differ from the end of
  the `.part` file mean the server's file is not the one it began (a new version), and the download
  starts afresh; a server that ignores Range sends everything again;
- network errors and server errors (5xx, 429) are retried with exponential backoff; what asking
  again cannot change is not (a 404, a missing local file, a certificate that fails verification);
- every request says who is asking (User-Agent): Zenodo throttles anonymous clients; and asks for
  the file's own bytes (Accept-Encoding: identity); a body compressed anyway (gzip, deflate) is decoded,
  since the checksum is of the file;
- a `.part` file that is already complete (a run that died before the rename) is recognised by its
  checksum, or without one by the server sending nothing after the 4 KiB asked for again;
- the checksum is computed on the finished `.part` file; only a file that matches is renamed to
  its final name (an atomic rename), so the final path never holds a broken download; one that
  does not match is kept as `<file>.mismatch` for the user to inspect.

Why not `pooch.retrieve` (pooch gives data_fetch its cache folder): it streams into a temporary file
that is deleted when the transfer fails, so an interrupted download of a dataset (BUSI: about 200
MB) starts over, and it retries a checksum mismatch like a network error, fetching the same wrong
file again; what is above needs the `.part` file kept between attempts and between runs.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import operator
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

USER_AGENT = "mtlearn-data_fetch/0.1 (course dataset downloader; Python urllib)"
RETRIES = 4  # attempts after the first one
BACKOFF_SECONDS = 2.0  # wait 2, 4, 8, 16 s between attempts
MAX_RETRY_AFTER_SECONDS = 120.0  # the longest wait a server's Retry-After may ask for
TIMEOUT_SECONDS = 60.0  # per network read
CHUNK_BYTES = 1 << 16
OVERLAP_BYTES = 1 << 12  # a resumed download asks for these last bytes of the .part file again, to compare
# Errors of this machine's disk, not of the host: asking the host again cannot help.
LOCAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# Why a request failed, where asking again gets the same answer: a file:// path that is wrong or unreadable
# (urllib wraps the error of opening it in a URLError), a certificate that is expired, self-signed or for
# another host. Other TLS errors (a handshake cut short) are the passing trouble of unreliable hosts.
FINAL_REASONS = (
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ssl.SSLCertVerificationError,
)


class FetchError(RuntimeError):
    """Base class of everything data_fetch raises about a download or an archive."""


class DownloadError(FetchError):
    """The host could not deliver the file (after all retries)."""


class HashMismatchError(FetchError):
    """The file arrived, but its checksum is not the expected one.

    `actual` ("sha256:<hex>", in the algorithm of the expected checksum) lets a user who checked the
    file pin it; `kept` is where a mismatched download was kept (None: nothing was moved).
    """

    def __init__(self, message: str, actual: str | None = None, kept: Path | None = None):
        super().__init__(message)
        self.actual, self.kept = actual, kept


def parse_hash(known_hash: str | None) -> tuple[str, str] | None:
    """"md5:abc..." / "sha256:abc..." (or a bare 32/64-digit hex) -> (algorithm, hex digest)."""
    if known_hash is None:
        return None
    algorithm, _, digest = known_hash.strip().lower().rpartition(":")
    if not algorithm:
        algorithm = {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algorithm not in ("md5", "sha1", "sha256") or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"cannot read the checksum {known_hash!r}; expected 'sha256:<hex>' or 'md5:<hex>'")
    length = 2 * hashlib.new(algorithm).digest_size  # md5 32, sha1 40, sha256 64 hex digits
    if len(digest) != length:
        raise ValueError(
            f"the checksum {known_hash!r} has {len(digest)} hex digits; a {algorithm} digest has {length} "
            "(copied only part of it?)"
        )
    return algorithm, digest


def check_retries(retries) -> int:
    """`retries` as an int >= 0, or a ValueError saying so: -1 would make no attempt at all (and fail on
    a `.part` file that was never written), 2.0 would fail inside range(). Not mtlearn.utils.check_int:
    data_fetch works without mtlearn and torch."""
    try:
        count = operator.index(retries)  # ints and NumPy ints; floats raise TypeError
    except TypeError:
        count = None
    if count is None or isinstance(retries, bool) or count < 0:
        fix = "; pass an int, e.g. int(...) of a computed value" if isinstance(retries, float) else ""
        raise ValueError(f"retries must be an integer >= 0 (attempts after the first one), got {retries!r}{fix}")
    return count


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: Path, known_hash: str | None, name: str | None = None) -> None:
    """Raise HashMismatchError naming the expected and the actual checksum if they differ.

    `name` is what the message calls the file (default: its own name; a `.part` file is named
    after the file it will become).
    """
    expected = parse_hash(known_hash)
    if expected is None:
        return
    algorithm, digest = expected
    actual = file_hash(path, algorithm)
    if actual != digest:
        raise HashMismatchError(
            f"{name or path.name} is corrupted or not the expected file: expected {algorithm}:{digest}, "
            f"got {algorithm}:{actual}",
            actual=f"{algorithm}:{actual}",
        )


def download_file(
    url: str, path: Path, known_hash: str | None = None, progress: bool = True, retries: int = RETRIES
) -> None:
    """Download `url` to `path` (resuming a `.part` file left by an earlier attempt), verify, rename.

    Raises DownloadError when the host fails after `retries` retries (the `.part` file is kept,
    so the next call resumes) and HashMismatchError when the checksum differs (the `.part` file
    is moved to `<path>.mismatch`: the next call starts afresh, or takes that file if it matches the
    checksum asked for then, e.g. one the user accepted with --hash). Nothing is ever left at `path`
    unless verified; with no `known_hash` there is nothing to verify against, and the caller checks
    what it can (`data_fetch.fetch`: that an archive is a zip). Each retry is announced on stderr.
    """
    retries = check_retries(retries)
    path = Path(path)
    part = path.with_name(path.name + ".part")
    expected = parse_hash(known_hash)
    mismatch = path.with_name(path.name + ".mismatch")
    for link in (part, mismatch):  # ours are plain files: a link (in a folder others write) would send the
        if link.is_symlink():      # download into, or take it from, the file it points at
            link.unlink()
    for earlier in (part, mismatch):
        # An earlier run died between the download and the rename, or kept a file that did not match the checksum
        # it had, which the one asked for now accepts (--hash after checking that copy): no request needed.
        if expected and earlier.exists() and file_hash(earlier, expected[0]) == expected[1]:
            os.replace(earlier, path)
            part.unlink(missing_ok=True)
            return
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, progress)
            break
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, dropped connections
            if _local_write_error(error):
                raise  # the folder or the disk (no permission, disk full), not the host: retrying will not help
            if attempt == retries or not _worth_retrying(error):
                raise DownloadError(f"{type(error).__name__}: {error}") from error
            wait = _retry_after(error) or BACKOFF_SECONDS * 2**attempt
            # said, so that up to a few minutes of retries (60 s timeouts) do not look like a hang
            print(f"{path.name}: attempt {attempt + 1} of {retries + 1} failed ({type(error).__name__}: {error}); "
                  f"retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    try:
        check_hash(part, known_hash, name=path.name)
    except HashMismatchError as error:
        # Kept rather than deleted: if the host re-packed the file, every retry gets these same bytes,
        # and a user who checks this copy can accept it without downloading it again.
        kept = mismatch
        os.replace(part, kept)
        raise HashMismatchError(
            f"{error} (downloaded from {url}); it was kept as {kept}, not as {path.name}",
            actual=error.actual, kept=kept,
        ) from None
    os.replace(part, path)  # atomic: `path` appears complete or not at all
    mismatch.unlink(missing_ok=True)  # an earlier attempt's file that failed the check: this one passed it


def _transfer(url: str, part: Path, progress: bool) -> None:
    """One request: append the missing bytes to `part` (or rewrite it) until the server is done.

    A `.part` file longer than OVERLAP_BYTES is resumed from OVERLAP_BYTES before its end, and those bytes
    must be the ones it holds: else the server's file is another (a new version), and the `.part` file is
    dropped. A shorter one is not worth a range request: it is downloaded again.
    """
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if offset <= OVERLAP_BYTES:
        offset = 0
    # identity: the bytes of the file itself, which the checksum is of (urllib would not decode a gzip body)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    asked = offset - OVERLAP_BYTES if offset else 0  # where the bytes asked for begin
    if offset:
        headers["Range"] = f"bytes={asked}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        error.close()  # its body goes unread: the connection closes now, not whenever the error is collected
        if error.code == 416:  # the file is shorter than our partial one: another file, start again
            part.unlink()
        raise
    with response:
        decoder = _decoder(response.headers.get("Content-Encoding"))
        start = _range_start(response.headers.get("Content-Range")) if response.status == 206 else 0
        if start is None and offset == 0:
            start = 0  # nothing was asked for by range: a 206 without Content-Range can only be the whole file
        if start not in (0, asked):  # a part from elsewhere in the file: neither what we asked for nor all of it
            part.unlink(missing_ok=True)
            sent = f"bytes from {start} on" if start is not None else "part of the file without saying which"
            raise ConnectionError(f"the server sent {sent} where bytes from {asked} on were asked for; "
                                  "the partial download was dropped, the next attempt starts afresh")
        resumed = offset > 0 and start == asked
        if decoder is not None and resumed:
            # a range of the compressed stream cannot be appended to the bytes decoded so far
            part.unlink()
            raise ConnectionError("the server compressed the rest of the file (Content-Encoding) in answer to a "
                                  "range request; the partial download was dropped, the next attempt starts afresh")
        length = _content_length(response.headers.get("Content-Length"))  # what is sent: compressed, if compressed
        whole = _range_total(response.headers.get("Content-Range")) if resumed else None  # the file's size
        overlap = _read_exactly(response, OVERLAP_BYTES) if resumed else b""
        promised = [n for n in (length, None if whole is None else whole - asked) if n is not None]  # from `asked`
        if resumed and any(len(overlap) < min(n, OVERLAP_BYTES) for n in promised):
            # cut off before the new bytes (the server had promised more): the .part file is kept for a retry
            raise ConnectionError(f"connection closed after {len(overlap)} of the {OVERLAP_BYTES} bytes the partial "
                                  "download is checked with")
        if resumed and overlap != _tail(part, OVERLAP_BYTES):
            part.unlink()  # appending would splice two versions of the file; without a checksum, unnoticed
            raise ConnectionError(f"the file on the server is not the one the partial download began (bytes "
                                  f"{asked}-{offset - 1} differ): the partial download was dropped, the next "
                                  "attempt starts afresh")
        if offset and not resumed and "html" in (response.headers.get("Content-Type") or "").lower():
            # a web page (a rate-limit or error page) in answer to a range request: not the file, so the partial
            # download it would replace is kept for the next attempt
            raise ConnectionError(f"the server answered the range request with a web page "
                                  f"({response.headers.get('Content-Type')}), not the file")
        if not resumed:
            offset = 0  # the server sent the whole file
        total = (asked if resumed else 0) + length if length is not None else None
        if whole is not None:  # a host that caps its range answers sends less than the rest: the next attempt resumes
            total = whole
        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.stem, disable=not progress)
        # not through a link (one planted after download_file removed any: the check and the open are apart);
        # O_BINARY on Windows, where a descriptor opened without it writes each byte 10 as 13, 10
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resumed else os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(part, flags, 0o666), "ab" if resumed else "wb") as f, bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    received += len(chunk)
                    f.write(chunk if decoder is None else decoder.decompress(chunk))
                    bar.update(len(chunk))
                if decoder is not None:
                    f.write(decoder.flush())
            except zlib.error as error:  # a body labelled gzip that is not: a server fault, like a dropped connection
                f.close()
                part.unlink(missing_ok=True)
                raise ConnectionError(f"the server's {response.headers.get('Content-Encoding')} body could not be "
                                      f"decoded ({error}); the next attempt starts afresh") from None
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")
    if decoder is not None and not decoder.eof:
        raise ConnectionError(f"connection closed after {received} bytes, before the end of the compressed body")


def _retry_after(error: Exception) -> float | None:
    """The wait a rate-limited or busy server asks for (429/503 with Retry-After in seconds), at most
    MAX_RETRY_AFTER_SECONDS; None when it names none (or a date, which we do not parse)."""
    if not isinstance(error, urllib.error.HTTPError) or error.headers is None:
        return None
    value = (error.headers.get("Retry-After") or "").strip()
    return min(float(value), MAX_RETRY_AFTER_SECONDS) if value.isdigit() else None


def _decoder(content_encoding: str | None):
    """A zlib decompressor for a body a server compressed although asked not to (gzip, deflate);
    None for the file's own bytes. An encoding zlib cannot undo is a DownloadError."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS)
    raise DownloadError(f"the server sent the file compressed as {content_encoding!r} although asked for it "
                        "uncompressed, and data_fetch cannot undo that; download it in a browser instead")


def _read_exactly(response, count: int) -> bytes:
    """The next `count` bytes of `response` (fewer only where it ends): one read() may return less."""
    data = b""
    while len(data) < count and (chunk := response.read(count - len(data))):
        data += chunk
    return data


def _tail(path: Path, count: int) -> bytes:
    """The last `count` bytes of the file `path`."""
    with open(path, "rb") as f:
        f.seek(-count, os.SEEK_END)
        return f.read()


def _content_length(value: str | None) -> int | None:
    """Content-Length as a number; a header sent twice ("300000, 300000") counts when both agree, and one that
    is no number, or two that disagree, as missing (the body is then read to its end)."""
    values = {v.strip() for v in (value or "").split(",")}
    return int(values.pop()) if len(values) == 1 and next(iter(values)).isdigit() else None


def _range_total(content_range: str | None) -> int | None:
    """'bytes 100-199/300' -> 300 (the whole file's size); None when unknown ('/*') or malformed."""
    match = re.match(r"bytes \d+-\d+/(\d+)", content_range or "")
    return int(match.group(1)) if match else None


def _range_start(content_range: str | None) -> int | None:
    """'bytes 100-199/200' -> 100."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _local_write_error(error: Exception) -> bool:
    """Whether writing the `.part` file failed on this machine: no permission, a file where a folder
    should be, disk full, over quota, read-only file system."""
    if isinstance(error, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(error, OSError) and error.errno in LOCAL_WRITE_ERRNOS


def _worth_retrying(error: Exception) -> bool:
    """Network trouble and server-side errors are retried; 'not found', 'forbidden' and the like are not,
    nor a missing local file or a certificate that fails verification."""
    if isinstance(error, http.client.InvalidURL):  # a bad port, a space in the address: the same every time
        return False
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 416, 429) or error.code >= 500
    if isinstance(error, urllib.error.URLError):
        return not isinstance(error.reason, FINAL_REASONS)
    return True
