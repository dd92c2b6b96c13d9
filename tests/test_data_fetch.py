"""data_fetch against a local HTTP server: resume, retries, checksums, markers, unsafe archives."""

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import random
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data_fetch
from data_fetch import DownloadError, HashMismatchError, UnsafeArchiveError, fetch
from data_fetch.__main__ import main
from data_fetch.download import OVERLAP_BYTES, download_file, parse_hash
from tests.fixtures_real import zip_bytes

PAYLOAD = bytes(range(256)) * 400  # 100 kB, several chunks
ARCHIVE = zip_bytes({"BUSBRA/bus_data.csv": b"ID,Case,Pathology\n", "BUSBRA/Images/bus_0001-l.png": b"png"})


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def resume_at(size: int) -> str:
    """The Range header resuming a .part file of `size` bytes: its last OVERLAP_BYTES are asked for again."""
    return f"bytes={size - OVERLAP_BYTES}-"


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours Range unless `server.ignore_range` (a Range at or past the end gets
    416, as real servers answer); can drop a response midway; answers the first requests with the
    HTTP errors queued in `server.errors` (say, [503, 429]); with `server.range_from_zero` it answers a
    Range with a 206 that starts at byte 0 (the whole file, as its Content-Range says); with
    `server.range_start` (once) at that byte instead; `server.retry_after` goes with the queued errors;
    `server.bare_206` answers every request 206 without Content-Range; `server.encoding` ("gzip",
    "deflate", "br") compresses the answer whatever the client asked for, ignoring Range unless
    `server.encoded_ranges` (then a Range gets that part of the compressed bytes); `server.no_length`
    leaves Content-Length out (the end of the connection ends the body)."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range"), self.headers.get("User-Agent")))
        server.accept_encodings.append(self.headers.get("Accept-Encoding"))
        if server.errors:
            code = server.errors.pop(0)
            if server.retry_after is None:
                self.send_error(code)
                return
            self.send_response(code)
            self.send_header("Retry-After", server.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = server.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        start = 0
        if server.encoding is not None:
            compress = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress,
                        "br": lambda b: b"not brotli"}
            data = compress[server.encoding.strip().lower()](data)
        if self.headers.get("Range") and server.encoding is not None and not server.encoded_ranges:
            self.send_response(200)  # a compressing server that does not do ranges
        elif self.headers.get("Range") and not server.ignore_range and not server.bare_206:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if server.range_from_zero:
                start = 0
            if server.range_start is not None:
                start, server.range_start = server.range_start, None
            if start >= len(data):  # nothing left to send (RFC 9110: 416 names the full length)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        elif server.bare_206:  # a broken server: 206 for every answer, without saying which bytes
            start = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = data[start:]
        if server.encoding is not None:
            self.send_header("Content-Encoding", server.encoding)
        if not server.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops:  # announce everything, send part of it, hang up
            server.drops -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@contextlib.contextmanager
def serving(handler):
    """A ThreadingHTTPServer of `handler` on 127.0.0.1 (any free port), serving in a thread until the block ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server():
    with serving(Handler) as httpd:
        httpd.files, httpd.requests, httpd.drops, httpd.ignore_range, httpd.errors = {}, [], 0, False, []
        httpd.range_from_zero, httpd.range_start, httpd.retry_after, httpd.bare_206 = False, None, None, False
        httpd.encoding, httpd.encoded_ranges, httpd.accept_encodings, httpd.no_length = None, False, [], False
        yield httpd


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """No waits between attempts; its value is the module's own backoff, for the test of the defaults."""
    own = data_fetch.download.BACKOFF_SECONDS
    monkeypatch.setattr(data_fetch.download, "BACKOFF_SECONDS", 0.0)
    return own


def test_download_and_second_fetch_downloads_nothing(server, tmp_path):
    server.files["/breastmnist.npz"] = PAYLOAD
    url = server.url + "/breastmnist.npz"
    folder = fetch("breastmnist", dest=tmp_path, url=url, known_hash=sha256(PAYLOAD), progress=False)
    assert folder == tmp_path and (tmp_path / "breastmnist.npz").read_bytes() == PAYLOAD
    assert not (tmp_path / "breastmnist.npz.part").exists()
    assert "mtlearn-data_fetch" in server.requests[0][2]  # identifies itself
    count = len(server.requests)
    fetch("breastmnist", dest=tmp_path, url=server.url + "/breastmnist.npz", known_hash=sha256(PAYLOAD), progress=False)
    assert len(server.requests) == count


def test_archive_is_extracted_once_with_a_marker(server, tmp_path):
    server.files["/BUSBRA.zip"] = ARCHIVE
    fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=sha256(ARCHIVE), progress=False)
    assert (tmp_path / "BUSBRA" / "bus_data.csv").is_file() and (tmp_path / ".bus_bra.complete").is_file()
    record = json.loads((tmp_path / ".bus_bra.complete").read_text())  # where the files came from, for a reader
    assert record["url"] == server.url + "/BUSBRA.zip" and record["known_hash"] == sha256(ARCHIVE)
    count = len(server.requests)
    fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=sha256(ARCHIVE), progress=False)
    assert len(server.requests) == count


def test_a_marker_cut_short_by_a_full_disk_is_not_left_behind(server, tmp_path, monkeypatch):
    """The marker vouches for the whole folder: half of one (the disk full while writing it) passed the
    loader's check, and switched off the warning about files deleted since."""
    import pathlib

    server.files["/BUSBRA.zip"] = ARCHIVE
    write_text = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".bus_bra.complete"):
            write_text(self, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=sha256(ARCHIVE), progress=False)
    assert (tmp_path / "BUSBRA" / "bus_data.csv").is_file()  # unpacked, but not vouched for
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bus_bra.complete")]
    assert (tmp_path / ".bus_bra.unpacking").is_file()  # kept until the marker is: the next fetch may replace all


def test_deleted_files_or_another_checksum_make_the_next_fetch_check_again(server, tmp_path, capsys):
    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "progress": False}
    fetch("bus_bra", known_hash=sha256(ARCHIVE), **kwargs)
    (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").unlink()  # say, cleaned up by hand
    count = len(server.requests)
    fetch("bus_bra", known_hash=sha256(ARCHIVE), **kwargs)
    assert len(server.requests) == count  # the archive is still there: checked and unpacked, not downloaded
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png"
    # said once: fetch looked before taking its lock and again under it, and printed both times
    said = capsys.readouterr().out
    assert said.count("1 file(s) of the last fetch are missing (e.g. BUSBRA/Images/bus_0001-l.png)") == 1
    with pytest.raises(HashMismatchError):  # a checksum pinned later is checked, not ignored
        fetch("bus_bra", known_hash="md5:" + "0" * 32, **kwargs)
    assert (tmp_path / ".bus_bra.complete").exists()  # and a wrong one does not undo the good fetch
    assert capsys.readouterr().out.count("a different checksum than the one of the last fetch was given") == 1


def test_unreadable_marker_is_not_trusted(server, tmp_path):
    """A marker cut short (disk full, killed while writing) proves nothing: check and unpack again."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "known_hash": sha256(ARCHIVE), "progress": False}
    fetch("bus_bra", **kwargs)
    (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").unlink()
    (tmp_path / ".bus_bra.complete").write_text('{"name": "bus_b')
    fetch("bus_bra", **kwargs)
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png" and len(server.requests) == 1
    assert json.loads((tmp_path / ".bus_bra.complete").read_text())["known_hash"] == sha256(ARCHIVE)
    # whole JSON, but a checksum that cannot be read (edited by hand): also unpacked again, not a ValueError
    (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").unlink()
    record = json.loads((tmp_path / ".bus_bra.complete").read_text())
    (tmp_path / ".bus_bra.complete").write_text(json.dumps({**record, "known_hash": "sha256:not-a-checksum"}))
    fetch("bus_bra", **kwargs)
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png" and len(server.requests) == 1
    # whole JSON that is no record at all (a list): also unpacked again, not an AttributeError
    (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").unlink()
    (tmp_path / ".bus_bra.complete").write_text("[1]")
    fetch("bus_bra", **kwargs)
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png" and len(server.requests) == 1


def test_marker_without_a_file_list_still_notices_a_deleted_file(server, tmp_path):
    """Markers written before file lists were recorded: the downloaded file itself is still checked for."""
    server.files["/breastmnist.npz"] = PAYLOAD
    url = server.url + "/breastmnist.npz"
    record = {"name": "breastmnist", "url": url, "known_hash": sha256(PAYLOAD)}  # the file is gone since
    (tmp_path / ".breastmnist.complete").write_text(json.dumps(record))
    fetch("breastmnist", dest=tmp_path, url=url, known_hash=sha256(PAYLOAD), progress=False)
    assert (tmp_path / "breastmnist.npz").read_bytes() == PAYLOAD and len(server.requests) == 1


def test_escaping_member_of_a_nested_zip_is_refused(server, tmp_path):
    """The zip inside the download (Mendeley wraps BUS-UCLM's) is checked like the outer one."""
    inner = zip_bytes({"BUS-UCLM/INFO.csv": b"x", "../../evil.txt": b"evil"})
    outer = zip_bytes({"dataset/BUS-UCLM.zip": inner})
    server.files["/uclm.zip"] = outer
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=r"refusing to unpack BUS-UCLM.zip \(inside .*\): member '../../evil"):
        fetch("bus_uclm", dest=dest, url=server.url + "/uclm.zip", known_hash=sha256(outer), progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "evil.txt").exists()
    # the inner names are checked before the outer archive is unpacked: only the download is there
    assert [path.name for path in dest.iterdir()] == [data_fetch.SOURCES["bus_uclm"].filename]


def test_mac_resource_forks_named_zip_are_not_unpacked(tmp_path):
    """A zip made on a Mac carries `__MACOSX/.../._X.zip` metadata files: not archives, so not unpacked."""
    from data_fetch.archive import extract_zip

    inner = zip_bytes({"BUS-UCLM/INFO.csv": b"x"})
    debris = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # AppleDouble header
    outer = tmp_path / "outer.zip"
    outer.write_bytes(zip_bytes({"dataset/BUS-UCLM.zip": inner, "__MACOSX/dataset/._BUS-UCLM.zip": debris,
                                 "dataset/._other.zip": debris}))
    names = extract_zip(outer, tmp_path / "dest")
    assert "dataset/BUS-UCLM/INFO.csv" in names and (tmp_path / "dest/dataset/BUS-UCLM/INFO.csv").is_file()
    assert (tmp_path / "dest/__MACOSX/dataset/._BUS-UCLM.zip").read_bytes() == debris
    from data_fetch.archive import _is_wrapped_zip

    assert not _is_wrapped_zip("__MACOSX/dataset/BUS-UCLM.zip")  # anything under __MACOSX, "._" or not


def test_unreadable_zip_inside_the_download_names_both_and_extracts_nothing(tmp_path):
    from data_fetch.archive import extract_zip

    outer = tmp_path / "uclm.zip"
    outer.write_bytes(zip_bytes({"dataset/BUS-UCLM.zip": b"not a zip at all", "dataset/readme.txt": b"r"}))
    with pytest.raises(data_fetch.FetchError, match="dataset/BUS-UCLM.zip inside .*uclm.zip is not a readable zip"):
        extract_zip(outer, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_an_archive_larger_than_the_free_space_is_refused_before_unpacking(tmp_path, monkeypatch):
    """Nested zips count with what they unpack to; the nearest existing folder is asked (same disk)."""
    import collections

    from data_fetch import archive as archive_module

    inner = zip_bytes({"BUS-UCLM/a.png": bytes(3000)})
    outer = tmp_path / "uclm.zip"
    outer.write_bytes(zip_bytes({"dataset/BUS-UCLM.zip": inner, "dataset/readme.txt": bytes(1000)}))
    needed = len(inner) + 1000 + 3000
    asked = []

    def disk_usage(path, free):
        asked.append(path)
        return collections.namedtuple("usage", "total used free")(10**9, 10**9 - free, free)

    monkeypatch.setattr(archive_module.shutil, "disk_usage", lambda path: disk_usage(path, needed - 1))
    refused = r"needs 0\.0 MB and .* has 0\.0 MB free; nothing was extracted.*--dest"
    with pytest.raises(data_fetch.FetchError, match=refused):
        archive_module.extract_zip(outer, tmp_path / "new" / "dest")
    assert asked == [tmp_path] and not (tmp_path / "new").exists()
    monkeypatch.setattr(archive_module.shutil, "disk_usage", lambda path: disk_usage(path, needed))
    assert "dataset/BUS-UCLM/a.png" in archive_module.extract_zip(outer, tmp_path / "new" / "dest")


def test_a_member_name_with_dot_dot_is_refused_even_where_it_stays_inside(tmp_path):
    """zipfile writes "a/../b.txt" as a/b.txt while the marker would list the name as given: the file would
    count as missing on every later check, and the dataset be unpacked again each time."""
    from data_fetch.archive import extract_zip

    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_bytes({"a/../b.txt": b"b"}))
    with pytest.raises(UnsafeArchiveError, match=r"member 'a/../b.txt' would be written outside"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_member_that_would_overwrite_the_archive_is_refused(tmp_path):
    from data_fetch.archive import extract_zip

    archive = tmp_path / "data.zip"
    archive.write_bytes(zip_bytes({"data.zip": b"inner", "data/a.txt": b"a"}))
    with pytest.raises(UnsafeArchiveError, match="overwrite the archive itself"):
        extract_zip(archive, tmp_path)
    assert archive.read_bytes().startswith(b"PK") and not (tmp_path / "data").exists()


def test_member_of_a_nested_zip_that_would_overwrite_the_outer_archive_is_refused(tmp_path):
    """The inner zip is unpacked after the outer one was read and verified: it could replace the download."""
    from data_fetch.archive import extract_zip

    archive = tmp_path / "outer.zip"
    archive.write_bytes(zip_bytes({"inner.zip": zip_bytes({"outer.zip": b"HACKED"})}))
    with pytest.raises(UnsafeArchiveError, match=r"inner.zip \(inside outer.zip\): member 'outer.zip' would "
                                                 r"overwrite outer.zip, the archive it came in"):
        extract_zip(archive, tmp_path)
    assert archive.read_bytes().startswith(b"PK") and sorted(p.name for p in tmp_path.iterdir()) == ["outer.zip"]


def test_a_nested_zip_that_would_replace_another_nested_zip_is_refused(tmp_path):
    """Each inner zip is checked as it is in the archive, and unpacked later: a.zip wrote another b.zip over the
    checked one, whose member then replaced a file of the user's in --dest (.bashrc) unchecked."""
    from data_fetch.archive import extract_zip

    (tmp_path / ".bashrc").write_text("mine")
    archive = tmp_path / "outer.zip"
    archive.write_bytes(zip_bytes({"a.zip": zip_bytes({"b.zip": zip_bytes({".bashrc": b"echo PWNED"})}),
                                   "b.zip": zip_bytes({"readme.txt": b"harmless"})}))
    with pytest.raises(UnsafeArchiveError, match=re.escape("member 'b.zip' of a.zip (a zip in it) would replace b.zip, "
                                                           "another zip in outer.zip, before b.zip is unpacked")):
        extract_zip(archive, tmp_path, replaceable=[])
    assert (tmp_path / ".bashrc").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bashrc", "outer.zip"]  # nothing extracted


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", [".bus_bra.complete", ".BUS_BRA.COMPLETE", ".bus_bra.complete.tmp",
                                  ".bus_bra.unpacking", ".bus_bra.lock", "BUSBRA.zip.part", "BUSBRA.zip.mismatch",
                                  "BUSBRA.zip.not-a-zip"])
def test_an_archive_that_would_write_data_fetchs_own_files_is_refused(server, tmp_path, nested, name):
    """A member .bus_bra.complete (listing no files), with a later member cut short: the fetch failed, and the next
    one found the planted marker and said the half-unpacked dataset was ready. The letter case aside: on macOS
    and Windows .BUS_BRA.COMPLETE is that file."""
    planted = {name: b'{"name": "bus_bra", "known_hash": null, "files": []}'}
    members = {"BUSBRA/Images/bus_0001-l.png": b"png"}
    members.update({"inner.zip": zip_bytes(planted)} if nested else planted)
    archive = zip_bytes(members)
    server.files["/BUSBRA.zip"] = archive
    with pytest.raises(UnsafeArchiveError, match=rf"member '{re.escape(name)}' (of inner\.zip \(a zip in it\) )?"
                                                 r"would replace a file of data_fetch's own; the archive is damaged or "
                                                 r"malicious, nothing was extracted"):
        fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=sha256(archive), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BUSBRA.zip"]  # nothing extracted


def test_half_extracted_folder_is_not_done(server, tmp_path):
    """Archive on disk but no marker (say, the machine died while unpacking): unpack again, no download."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    (tmp_path / "BUSBRA.zip").write_bytes(ARCHIVE)
    fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=sha256(ARCHIVE), progress=False)
    assert server.requests == [] and (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png"


def test_corrupted_download_names_both_hashes_and_is_kept_aside(server, tmp_path):
    server.files["/busi_128.npz"] = PAYLOAD
    expected = "md5:" + "0" * 32
    with pytest.raises(HashMismatchError) as error:
        fetch("busi_128", dest=tmp_path, url=server.url + "/busi_128.npz", known_hash=expected, progress=False)
    message = str(error.value)
    assert expected in message and "md5:" + hashlib.md5(PAYLOAD).hexdigest() in message
    assert "run again to retry" in message and "not official" not in message  # an official pin: retrying is right
    assert f"(downloaded from {server.url}/busi_128.npz)" in message  # which host (or mirror) sent the bad bytes
    kept = tmp_path / "busi_128.npz.mismatch"
    assert list(tmp_path.iterdir()) == [kept] and f"kept as {kept}" in message  # no final file, .part or marker


def test_mismatch_with_an_unofficial_pin_says_so_and_how_to_accept_the_file(server, tmp_path):
    """BUSI's sha256 was pinned by another project: a re-packed archive fails every retry the same way."""
    archive = zip_bytes({"Dataset_BUSI_with_GT/normal/normal (1).png": b"png"})
    server.files["/Dataset_BUSI.zip"] = archive
    with pytest.raises(HashMismatchError) as error:  # with BUSI's pinned checksum, which this zip has not
        fetch("busi", dest=tmp_path, url=server.url + "/Dataset_BUSI.zip", progress=False)
    message, kept, actual = str(error.value), tmp_path / "Dataset_BUSI.zip.mismatch", sha256(archive)
    assert message.startswith("Dataset_BUSI.zip is")  # the dataset's file, not its .part
    assert "pinned by another project" in message and "run again to retry" not in message
    assert kept.read_bytes() == archive and "it uses the kept Dataset_BUSI.zip.mismatch, without downloading" in message
    assert f"--hash {actual}" in message and error.value.actual == actual
    # following the advice uses the kept copy: no second download (it was renamed by hand before)
    assert main(["busi", "--dest", str(tmp_path), "--hash", actual, "--quiet"]) == 0
    assert len(server.requests) == 1 and (tmp_path / "Dataset_BUSI_with_GT/normal/normal (1).png").is_file()


def test_a_checksum_accepted_with_hash_keeps_holding_for_repairs(server, tmp_path, capsys):
    """After `--hash` accepted a re-packed BUSI, the repair command the loader prints (no --hash) must check
    against that accepted checksum, not the pinned one that refused the archive in the first place."""
    archive = zip_bytes({"Dataset_BUSI_with_GT/benign/benign (1).png": b"png1",
                         "Dataset_BUSI_with_GT/benign/benign (2).png": b"png2"})
    server.files["/Dataset_BUSI.zip"] = archive
    url = server.url + "/Dataset_BUSI.zip"
    with pytest.raises(HashMismatchError):
        fetch("busi", dest=tmp_path, url=url, progress=False)
    (tmp_path / "Dataset_BUSI.zip.mismatch").rename(tmp_path / "Dataset_BUSI.zip")
    assert main(["busi", "--dest", str(tmp_path), "--hash", sha256(archive), "--quiet"]) == 0
    image = tmp_path / "Dataset_BUSI_with_GT/benign/benign (2).png"
    image.unlink()  # later, an image is deleted: `python -m data_fetch busi --dest ...` restores it
    assert main(["busi", "--dest", str(tmp_path), "--quiet"]) == 0
    assert image.read_bytes() == b"png2" and len(server.requests) == 1  # unpacked again, not downloaded
    assert "different checksum" not in capsys.readouterr().out
    # the archive deleted too: downloaded again and checked against the accepted checksum
    image.unlink()
    (tmp_path / "Dataset_BUSI.zip").unlink()
    fetch("busi", dest=tmp_path, url=url, progress=False)
    assert image.read_bytes() == b"png2" and len(server.requests) == 2
    assert json.loads((tmp_path / ".busi.complete").read_text())["known_hash"] == sha256(archive)
    # an archive that is not the accepted one is refused, and the message says which checksum it was held to
    (tmp_path / "Dataset_BUSI.zip").write_bytes(zip_bytes({"Dataset_BUSI_with_GT/benign/benign (2).png": b"other"}))
    image.unlink()
    with pytest.raises(HashMismatchError, match=f"(?s)expected {sha256(archive)}.*recorded in .busi.complete"):
        fetch("busi", dest=tmp_path, url=url, progress=False)


@pytest.mark.parametrize("spelled", [str.lower, str.upper, lambda h: h.split(":")[1]])
def test_the_same_checksum_spelled_otherwise_is_not_another_one(server, tmp_path, capsys, spelled):
    """parse_hash reads "MD5:ABC..." and a bare "abc..." as "md5:abc...": the fetch must not count them as
    another checksum, which would unpack again or, with the archive deleted to save space, download it again."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    digest = "md5:" + hashlib.md5(ARCHIVE).hexdigest()
    fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=digest, progress=False)
    (tmp_path / "BUSBRA.zip").unlink()  # unpacked: the archive is not needed any more
    fetch("bus_bra", dest=tmp_path, url=server.url + "/BUSBRA.zip", known_hash=spelled(digest), progress=False)
    assert len(server.requests) == 1 and "different checksum" not in capsys.readouterr().out


def test_a_mistyped_hash_is_blamed_not_a_good_archive(server, tmp_path, monkeypatch):
    """A good archive held to a mistyped --hash was called corrupted, "delete it and fetch again": the download
    that followed failed the same way, and "a broken transfer ... run again" kept the user downloading."""
    import dataclasses

    server.files["/BUSBRA.zip"] = ARCHIVE
    url, wrong = server.url + "/BUSBRA.zip", "md5:" + "0" * 32
    fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
    (tmp_path / "BUSBRA" / "bus_data.csv").unlink()  # a repair is due: the archive is checked again
    with pytest.raises(HashMismatchError) as error:
        fetch("bus_bra", dest=tmp_path, url=url, known_hash=wrong, progress=False)
    message = str(error.value)
    assert f"matches the checksum the last fetch recorded ({sha256(ARCHIVE)})" in message
    assert "the --hash looks wrong. Run again without --hash" in message and "delete" not in message
    assert (tmp_path / "BUSBRA.zip").read_bytes() == ARCHIVE and len(server.requests) == 1
    # downloaded afresh: the pinned checksum holds, the kept copy is named with how to use it
    pinned = dataclasses.replace(data_fetch.get_source("bus_bra"), known_hash=sha256(ARCHIVE))
    monkeypatch.setitem(data_fetch.SOURCES, "bus_bra", pinned)
    with pytest.raises(HashMismatchError, match=r"matches the pinned checksum \(.*Run again without --hash .*: it "
                                                r"uses BUSBRA.zip.mismatch, without downloading it again"):
        fetch("bus_bra", dest=tmp_path / "fresh", url=url, known_hash=wrong, progress=False)
    fetch("bus_bra", dest=tmp_path / "fresh", url=url, progress=False)  # as it says: no second download
    assert len(server.requests) == 2 and (tmp_path / "fresh" / "BUSBRA" / "bus_data.csv").is_file()


def test_mismatch_with_your_own_checksum_does_not_blame_the_unofficial_pin(server, tmp_path):
    """BUSI with a checksum the user gave: the other project's pin is not involved, a broken transfer may be."""
    server.files["/Dataset_BUSI.zip"] = zip_bytes({"Dataset_BUSI_with_GT/normal/normal (1).png": b"png"})
    with pytest.raises(HashMismatchError) as error:
        fetch("busi", dest=tmp_path, url=server.url + "/Dataset_BUSI.zip", known_hash="sha256:" + "0" * 64,
              progress=False)
    assert "pinned by another project" not in str(error.value) and "run again to retry" in str(error.value)


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["/data.npz"] = PAYLOAD
    server.drops = 1
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD
    ranges = [r for _, r, _ in server.requests]
    assert ranges == [None, resume_at(len(PAYLOAD) // 3)]  # asked only for the rest (and 4 KiB to compare), once
    # every request identifies itself, the resumed one too (Zenodo throttles anonymous clients)
    assert all(agent and "mtlearn-data_fetch" in agent for _, _, agent in server.requests)


def test_partial_content_from_another_offset_is_not_appended(server, tmp_path):
    """A 206 whose Content-Range does not start where the .part file ends is not the rest of the file:
    appending it would duplicate bytes (here the server sends the whole file again as a 206)."""
    server.files["/data.npz"] = PAYLOAD
    server.drops, server.range_from_zero = 1, True
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert [r for _, r, _ in server.requests] == [None, resume_at(len(PAYLOAD) // 3)]
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not list(tmp_path.glob("*.mismatch"))


def test_a_partial_download_that_is_a_link_is_not_written_through(server, tmp_path):
    """In a data folder others can write, a planted data.npz.part linking to another file of the user's had that
    file overwritten with the download (appended to, in fact: it was taken for a partial download)."""
    server.files["/data.npz"] = PAYLOAD
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.npz.part").symlink_to(victim)
    download_file(server.url + "/data.npz", tmp_path / "data" / "data.npz", sha256(PAYLOAD), progress=False)
    assert victim.read_bytes() == b"mine" and (tmp_path / "data" / "data.npz").read_bytes() == PAYLOAD
    assert [r for _, r, _ in server.requests] == [None]  # the whole file, not a resume from the link's length


def test_a_link_planted_after_the_check_is_not_written_through_either(server, tmp_path, monkeypatch):
    """The check for a link and the opening of the partial download are apart: a link planted in between (here:
    one the check did not see) must still not receive the download."""
    import pathlib

    server.files["/data.npz"] = PAYLOAD
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.npz.part").symlink_to(victim)
    monkeypatch.setattr(pathlib.Path, "is_symlink", lambda self: False)  # planted just after the check
    with pytest.raises(DownloadError, match="symbolic link"):  # refused, not followed
        download_file(server.url + "/data.npz", tmp_path / "data" / "data.npz", sha256(PAYLOAD), progress=False)
    assert victim.read_bytes() == b"mine" and not (tmp_path / "data" / "data.npz").exists()


def test_the_partial_download_is_opened_in_binary_mode_where_the_platform_has_one(server, tmp_path, monkeypatch):
    """On Windows a descriptor from os.open without O_BINARY is in text mode: every byte 10 of a download was
    written as 13, 10, and every fetch ended in a checksum mismatch. (O_BINARY is faked here: POSIX has none.)"""
    fake_binary, opened, real_open = 1 << 30, [], os.open

    def recording_open(path, flags, *args, **kwargs):
        if str(path).endswith(".part"):
            opened.append(flags)
        return real_open(path, flags & ~fake_binary, *args, **kwargs)

    monkeypatch.setattr(os, "O_BINARY", fake_binary, raising=False)
    monkeypatch.setattr(os, "open", recording_open)
    server.files["/data.npz"] = PAYLOAD
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert opened and all(flags & fake_binary for flags in opened)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD


def test_a_kept_mismatch_that_is_a_link_is_not_taken(server, tmp_path):
    """A planted data.npz.mismatch linking to a file with the expected bytes elsewhere would be renamed in as the
    download: the link, not a file data_fetch kept."""
    server.files["/data.npz"] = PAYLOAD
    elsewhere = tmp_path / "elsewhere.npz"
    elsewhere.write_bytes(PAYLOAD)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.npz.mismatch").symlink_to(elsewhere)
    download_file(server.url + "/data.npz", tmp_path / "data" / "data.npz", sha256(PAYLOAD), progress=False)
    assert not (tmp_path / "data" / "data.npz").is_symlink() and server.requests  # downloaded, not linked in


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.files["/data.npz"] = PAYLOAD
    server.drops, server.ignore_range = 1, True
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD
    assert len(server.requests) == 2  # the 200 to the range request is the whole file, kept: not an attempt lost


def test_a_whole_file_sent_for_a_range_and_cut_short_is_not_completed_by_the_part_file(server, tmp_path):
    """The 200 replaces the .part file: its 70 kB must not count toward the 100 kB announced, or a body cut
    after 34 kB would look whole (70 + 34 > 100) and, with no checksum, be renamed into place."""
    server.files["/data.npz"] = PAYLOAD
    server.drops, server.ignore_range = 1, True
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD[:70_000])
    cut = len(PAYLOAD) // 3
    with pytest.raises(DownloadError, match=f"connection closed after {cut} of {len(PAYLOAD)} bytes"):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False, retries=0)
    assert not (tmp_path / "data.npz").exists() and (tmp_path / "data.npz.part").stat().st_size == cut


def test_leftover_part_file_resumes_or_restarts(server, tmp_path):
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD[:10_000])  # an earlier, interrupted run
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert server.requests[0][1] == resume_at(10_000) and (tmp_path / "data.npz").read_bytes() == PAYLOAD
    # a leftover too short to be worth a range request is downloaded again
    (tmp_path / "data.npz").unlink()
    (tmp_path / "data.npz.part").write_bytes(b"garbage")
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert server.requests[1][1] is None and (tmp_path / "data.npz").read_bytes() == PAYLOAD


@pytest.mark.parametrize("pinned", [True, False])
def test_a_part_file_of_another_version_of_the_file_is_dropped_not_completed(server, tmp_path, capsys, pinned):
    """The host replaced the file since the interrupted run: its new tail was appended to the old head,
    which failed the checksum with the advice to run again, or without one was renamed and unpacked."""
    old = bytes(reversed(PAYLOAD))
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "data.npz.part").write_bytes(old[:50_000])
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD) if pinned else None,
                  progress=False)
    assert [r for _, r, _ in server.requests] == [resume_at(50_000), None]  # compared, dropped, afresh
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not list(tmp_path.glob("*.mismatch"))
    assert "is not the one the partial download began (bytes 45904-49999 differ)" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [10, 5000])  # the bytes asked for again: partly in the file, or all past it (416)
def test_part_file_longer_than_the_file_restarts(server, tmp_path, extra):
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD + b"x" * extra)  # say, from a bigger earlier version
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert [r for _, r, _ in server.requests] == [resume_at(len(PAYLOAD) + extra), None]  # dropped, then everything
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not (tmp_path / "data.npz.part").exists()


def test_complete_unpinned_part_file_is_kept_even_without_retries(server, tmp_path):
    """No checksum to recognise it by: the server sends the 4 KiB asked for again, and nothing after them."""
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD)  # the earlier run died before the rename
    download_file(server.url + "/data.npz", tmp_path / "data.npz", None, progress=False, retries=0)
    assert [r for _, r, _ in server.requests] == [resume_at(len(PAYLOAD))]
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not (tmp_path / "data.npz.part").exists()


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", " GZIP", "deflate"])
@pytest.mark.parametrize("length", [True, False])
def test_a_compressed_answer_is_saved_decoded(server, tmp_path, encoding, length):
    """Asked for the file's own bytes (Accept-Encoding: identity), a server may compress it anyway:
    the checksum is of the file, so the body is decoded; one cut short is retried from the start,
    also where no Content-Length says how long it should have been (the stream's own end does)."""
    server.files["/data.npz"], server.encoding, server.drops, server.no_length = PAYLOAD, encoding, 1, not length
    download_file(server.url + "/data.npz", tmp_path / "data.npz", None, progress=False, retries=1)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD
    assert server.accept_encodings[0] == "identity" and len(server.requests) == 2


def test_a_compressed_range_is_not_appended_to_decoded_bytes(server, tmp_path, capsys):
    payload = random.Random(0).randbytes(20_000)  # does not compress: the range after byte 1000 exists
    server.files["/data.npz"], server.encoding, server.encoded_ranges = payload, "gzip", True
    (tmp_path / "data.npz.part").write_bytes(payload[:10_000])  # decoded bytes of an interrupted run
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(payload), progress=False)
    assert [r for _, r, _ in server.requests] == [resume_at(10_000), None]  # dropped, then afresh
    assert (tmp_path / "data.npz").read_bytes() == payload
    assert "the server compressed the rest of the file (Content-Encoding)" in capsys.readouterr().err


def test_an_encoding_zlib_cannot_undo_is_named_and_not_retried(server, tmp_path):
    server.files["/data.npz"], server.encoding = PAYLOAD, "br"
    with pytest.raises(DownloadError, match="compressed as 'br'.*download it in a browser"):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert len(server.requests) == 1 and not (tmp_path / "data.npz").exists()


def test_complete_part_file_is_checked_and_used_without_a_request(server, tmp_path):
    """The run died between the download and the rename: the bytes are all there."""
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD)
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert server.requests == [] and (tmp_path / "data.npz").read_bytes() == PAYLOAD
    assert not (tmp_path / "data.npz.part").exists()


def test_final_name_appears_only_after_the_checksum_passed(server, tmp_path, monkeypatch):
    """Hashing a big download takes a while: Ctrl-C then must leave only the .part (which the next run
    verifies), never an unchecked file under the final name."""
    server.files["/data.npz"] = PAYLOAD
    real_hash = data_fetch.download.file_hash

    def interrupted(path, algorithm="sha256"):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_fetch.download, "file_hash", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "data.npz.part"]
    monkeypatch.setattr(data_fetch.download, "file_hash", real_hash)
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert len(server.requests) == 1 and (tmp_path / "data.npz").read_bytes() == PAYLOAD


def test_ctrl_c_during_the_transfer_keeps_the_part_file_and_the_next_run_resumes(server, tmp_path, monkeypatch):
    """Ctrl-C is the usual interruption: the bytes received so far are kept, not asked for again."""

    class InterruptedBar:  # stands in for tqdm: the user presses Ctrl-C after the first chunk
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    server.files["/data.npz"] = PAYLOAD
    with monkeypatch.context() as patch:
        patch.setattr("tqdm.auto.tqdm", InterruptedBar)
        with pytest.raises(KeyboardInterrupt):
            download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    received = (tmp_path / "data.npz.part").stat().st_size
    assert 0 < received < len(PAYLOAD) and not (tmp_path / "data.npz").exists()
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert server.requests[1][1] == resume_at(received) and (tmp_path / "data.npz").read_bytes() == PAYLOAD


def test_gives_up_after_retries_and_keeps_the_part_file(server, tmp_path):
    server.files["/data.npz"] = PAYLOAD
    server.drops = 10
    with pytest.raises(DownloadError):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=2)
    assert len(server.requests) == 3 and (tmp_path / "data.npz.part").exists() and not (tmp_path / "data.npz").exists()


@pytest.mark.parametrize("errors", [[503], [503, 502], [429], [500, 429], [408]])
def test_server_errors_and_throttling_are_retried(server, tmp_path, errors):
    """5xx (the host is struggling), 429 (Zenodo throttling) and 408 (request timeout) are passing
    trouble: ask again."""
    server.files["/data.npz"] = PAYLOAD
    server.errors = list(errors)
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=2)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD
    assert len(server.requests) == len(errors) + 1  # one request per error, then the file


def test_retries_back_off_exponentially_and_say_so(server, tmp_path, monkeypatch, capsys):
    slept = []
    monkeypatch.setattr(data_fetch.download, "BACKOFF_SECONDS", 2.0)  # undo the autouse no_backoff
    monkeypatch.setattr(data_fetch.download.time, "sleep", slept.append)
    server.errors = [503] * 10
    with pytest.raises(DownloadError):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False, retries=3)
    assert slept == [2.0, 4.0, 8.0]  # doubling, and no wait after the last attempt
    said = capsys.readouterr().err.splitlines()  # minutes of silent retries would look like a hang
    assert len(said) == 3 and said[0].startswith("data.npz: attempt 1 of 4 failed (HTTPError: HTTP Error 503")
    assert said[2].endswith("retrying in 8 s")


def test_by_default_five_attempts_wait_2_4_8_16_seconds_and_each_read_60(server, tmp_path, monkeypatch, no_backoff):
    monkeypatch.setattr(data_fetch.download, "BACKOFF_SECONDS", no_backoff)  # the module's own value
    slept, timeouts = [], []
    monkeypatch.setattr(data_fetch.download.time, "sleep", slept.append)
    urlopen = data_fetch.download.urllib.request.urlopen

    def recorded(request, timeout):
        timeouts.append(timeout)
        return urlopen(request, timeout=timeout)

    monkeypatch.setattr(data_fetch.download.urllib.request, "urlopen", recorded)
    server.errors = [503] * 10
    with pytest.raises(DownloadError):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False)
    assert len(server.requests) == 5 and slept == [2.0, 4.0, 8.0, 16.0] and timeouts == [60.0] * 5


def test_persistent_server_error_gives_up_after_the_retries(server, tmp_path):
    server.files["/data.npz"] = PAYLOAD
    server.errors = [503] * 10
    with pytest.raises(DownloadError, match="503"):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=2)
    assert len(server.requests) == 3 and not (tmp_path / "data.npz").exists()


def test_a_host_that_never_answers_times_out(tmp_path, monkeypatch):
    """A host that accepts the connection and then says nothing must not hang the download forever."""
    monkeypatch.setattr(data_fetch.download, "TIMEOUT_SECONDS", 0.2)
    outcome = []

    def run():
        try:
            download_file(url, tmp_path / "data.npz", progress=False, retries=1)
        except DownloadError as error:
            outcome.append(str(error))

    with socket.socket() as silent:  # listens (the kernel completes the connection) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/data.npz"
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive() and outcome and "timed out" in outcome[0]


@pytest.mark.parametrize("errors", [[404], [503, 503]])
def test_an_error_answer_closes_its_connection(server, tmp_path, errors):
    """urllib's HTTPError holds the answer's open connection; it was left to the garbage collector (a
    ResourceWarning when a reference cycle freed the socket before its file)."""
    server.errors = list(errors)
    with pytest.raises(DownloadError, match=str(errors[-1])) as raised:
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False, retries=len(errors) - 1)
    answer = raised.value.__cause__
    assert isinstance(answer, urllib.error.HTTPError) and answer.fp.closed
    assert answer.headers is not None  # still read for Retry-After after the close


def test_not_found_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as error:
        fetch("breastmnist", dest=tmp_path, url=server.url + "/missing.npz", progress=False)
    assert len(server.requests) == 1
    # the message says what failed, where from, and how to get the file by hand
    message = str(error.value)
    assert "Not Found" in message and server.url + "/missing.npz" in message and "Download it by hand" in message
    assert not (tmp_path / "breastmnist.npz").exists() and not (tmp_path / "breastmnist.npz.part").exists()


def test_local_folder_errors_are_raised_at_once_not_retried(server, tmp_path):
    """The host delivered; the file cannot be written (a file where the folder should be): asking the
    host again cannot help, and the error is about the folder, not a DownloadError about the host."""
    server.files["/data.npz"] = PAYLOAD
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(NotADirectoryError):
        download_file(server.url + "/data.npz", tmp_path / "a_file" / "data.npz", sha256(PAYLOAD), progress=False,
                      retries=3)
    assert len(server.requests) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_or_read_only_disk_is_raised_at_once_not_retried(server, tmp_path, monkeypatch, code):
    """Disk full, over quota, read-only: the host is fine, so no retries and no manual-download advice."""
    calls = []

    def disk_fails(url, part, progress):
        calls.append(url)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(data_fetch.download, "_transfer", disk_fails)
    with pytest.raises(OSError) as error:
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False, retries=3)
    assert error.value.errno == code and not isinstance(error.value, DownloadError) and len(calls) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_command_line_says_the_disk_is_full_and_what_to_do(code, tmp_path, monkeypatch, capsys):
    def disk_full(url, part, progress):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(data_fetch.download, "_transfer", disk_full)
    assert main(["busi", "--dest", str(tmp_path / "busi"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write to {tmp_path / 'busi'} ({os.strerror(code)})" in err
    assert "free some space or choose another --dest" in err and "by hand" not in err


def test_a_folder_without_write_permission_is_named_with_the_way_out(tmp_path, monkeypatch, capsys):
    """A read-only data folder (an instructor's, shared) refused the fetch with a bare PermissionError naming the
    hidden lock file."""
    def read_only(folder, lock):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(lock))

    monkeypatch.setattr(data_fetch, "make_and_lock", read_only)  # root may write anywhere: the refusal is faked
    with pytest.raises(PermissionError, match=rf"^cannot write to {re.escape(str(tmp_path / 'busi'))}: no permission "
                                              r"to create files there; pass dest= a folder you can write to, or set "
                                              r"MTLEARN_DATA to one$") as error:
        fetch("busi", dest=tmp_path / "busi", progress=False)
    assert error.value.errno == errno.EACCES
    assert main(["busi", "--dest", str(tmp_path / "busi"), "--quiet"]) == 1
    said = capsys.readouterr().err
    assert f"cannot write to {tmp_path / 'busi'} ({os.strerror(errno.EACCES)}); choose another --dest" in said
    assert ".lock" not in said


@pytest.mark.parametrize("code", [403, 404])
def test_client_errors_are_not_retried_even_after_a_server_error(server, tmp_path, code):
    server.errors = [503, code, 503]  # the third would only be seen by a retry that should not happen
    with pytest.raises(DownloadError, match=str(code)):
        download_file(server.url + "/data.npz", tmp_path / "data.npz", progress=False, retries=4)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "member", ["../evil.txt", "/tmp/evil.txt", "BUSBRA/../../evil.txt", "C:\\evil.txt", "..\\evil.txt"]
)
def test_archive_members_escaping_the_folder_are_refused(server, tmp_path, member):
    archive = zip_bytes({"BUSBRA/ok.txt": b"fine", member: b"evil"})
    server.files["/BUSBRA.zip"] = archive
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        fetch("bus_bra", dest=dest, url=server.url + "/BUSBRA.zip", known_hash=sha256(archive), progress=False)
    assert not (dest / "BUSBRA").exists() and not (dest / ".bus_bra.complete").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_a_symlink_in_the_folder_does_not_carry_members_outside(tmp_path):
    """A link already in the dataset folder would let a harmless-looking member write elsewhere: where the
    member really lands is what is checked."""
    from data_fetch.archive import extract_zip

    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    dest.mkdir()
    (dest / "BUSBRA").symlink_to(outside, target_is_directory=True)
    archive = tmp_path / "BUSBRA.zip"
    archive.write_bytes(zip_bytes({"BUSBRA/evil.txt": b"evil"}))
    with pytest.raises(UnsafeArchiveError, match="would be written outside"):
        extract_zip(archive, dest)
    assert list(outside.iterdir()) == []


def test_a_nested_zip_named_with_backslashes_is_recorded_where_it_was_unpacked(server, tmp_path, capsys):
    """A Windows tool's "dataset\\BUS-UCLM.zip" is one file on POSIX, unpacked beside it; its files were recorded
    under dataset/, where they are not, so every later fetch unpacked again ("files of the last fetch are missing")."""
    outer = zip_bytes({"dataset\\BUS-UCLM.zip": zip_bytes({"BUS-UCLM/INFO.csv": b"Image;Label;Doppler;Marks\n"})})
    server.files["/uclm.zip"] = outer
    for _ in range(2):
        fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", known_hash=sha256(outer), progress=False)
    assert data_fetch.missing_files(tmp_path, "bus_uclm") == [] and "missing" not in capsys.readouterr().out


def test_nested_zip_is_unpacked(server, tmp_path):
    inner = zip_bytes({"BUS-UCLM/INFO.csv": b"Image;Label;Doppler;Marks\n"})
    outer = zip_bytes({"dataset/BUS-UCLM.zip": inner})
    server.files["/uclm.zip"] = outer
    fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", known_hash=sha256(outer), progress=False)
    assert (tmp_path / "dataset" / "BUS-UCLM" / "INFO.csv").is_file()
    # the marker lists the inner zip's files too, so that their deletion is noticed like any other
    record = json.loads(data_fetch.completion_marker(tmp_path, "bus_uclm").read_text())
    assert set(record["files"]) == {"dataset/BUS-UCLM.zip", "dataset/BUS-UCLM/INFO.csv"}
    (tmp_path / "dataset" / "BUS-UCLM" / "INFO.csv").unlink()
    count = len(server.requests)
    fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", known_hash=sha256(outer), progress=False)
    assert (tmp_path / "dataset" / "BUS-UCLM" / "INFO.csv").is_file() and len(server.requests) == count


def test_a_nested_zip_named_in_capitals_is_unpacked(tmp_path):
    from data_fetch.archive import extract_zip

    (tmp_path / "outer.zip").write_bytes(zip_bytes({"dataset/BUS-UCLM.ZIP": zip_bytes({"BUS-UCLM/INFO.csv": b"x"})}))
    assert set(extract_zip(tmp_path / "outer.zip", tmp_path / "dest")) == {"dataset/BUS-UCLM.ZIP",
                                                                           "dataset/BUS-UCLM/INFO.csv"}
    assert (tmp_path / "dest" / "dataset" / "BUS-UCLM" / "INFO.csv").read_bytes() == b"x"


def test_only_one_level_of_nested_zips_is_unpacked(tmp_path):
    """The host's wrapper is unpacked; a zip inside the dataset's own zip is its data, left as it is."""
    from data_fetch.archive import extract_zip

    inner = zip_bytes({"BUS-UCLM/INFO.csv": b"x", "BUS-UCLM/extra.zip": zip_bytes({"deep.txt": b"deep"})})
    (tmp_path / "outer.zip").write_bytes(zip_bytes({"dataset/BUS-UCLM.zip": inner}))
    names = extract_zip(tmp_path / "outer.zip", tmp_path / "dest")
    assert set(names) == {"dataset/BUS-UCLM.zip", "dataset/BUS-UCLM/INFO.csv", "dataset/BUS-UCLM/extra.zip"}
    assert not list((tmp_path / "dest").rglob("deep.txt"))


def test_damaged_compressed_data_is_a_clear_error(server, tmp_path):
    """No checksum for BUS-UCLM: a zip whose compressed bytes are damaged must say so, not raise zlib's error."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("BUS-UCLM/INFO.csv", b"Image;Label;Doppler;Marks\n" * 50)
    damaged = bytearray(buffer.getvalue())
    damaged[30 + len("BUS-UCLM/INFO.csv")] = 0xFF  # the first deflate block: an invalid block type
    server.files["/uclm.zip"] = bytes(damaged)
    with pytest.raises(data_fetch.FetchError, match="not a readable zip archive.*delete it and fetch again"):
        fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", progress=False)
    assert not (tmp_path / ".bus_uclm.complete").exists()


def test_source_without_checksum_prints_one_to_pin(server, tmp_path, capsys):
    archive = zip_bytes({"BUS-UCLM/INFO.csv": b"x"})
    server.files["/uclm.zip"] = archive
    fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", progress=False)
    out = capsys.readouterr().out
    # the command as printed pins this folder's copy, not one in the default data folder
    assert f'python -m data_fetch bus_uclm --dest "{tmp_path}" --hash {sha256(archive)}' in out


def test_error_page_is_not_offered_for_pinning(server, tmp_path, capsys):
    """A host that answers 200 with an HTML error page: no checksum to catch it, so unpacking must."""
    server.files["/uclm.zip"] = b"<html><body>Access denied</body></html>"
    with pytest.raises(DownloadError, match=r"not a zip archive but begins b'<html><body>Access denied.*', an "
                                            r"error or login page\?; it was kept as .*7fvgj4jsp7-1.zip.not-a-zip"):
        fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", progress=False)
    out = capsys.readouterr().out
    assert "Pin it" not in out and "sha256" not in out
    # nothing under the archive's name: the loader says "not downloaded", not "run data_fetch to unpack"
    assert not (tmp_path / "7fvgj4jsp7-1.zip").exists()
    assert (tmp_path / "7fvgj4jsp7-1.zip.not-a-zip").read_bytes() == server.files["/uclm.zip"]


def test_a_page_beginning_with_pk_is_no_zip_cut_short(server, tmp_path):
    """Only a zip's whole first header ("PK\\x03\\x04") makes a body "a zip cut short"; "PK" alone is text."""
    server.files["/uclm.zip"] = b"PKxx<html>not found</html>"
    with pytest.raises(DownloadError, match=r"not a zip archive but begins b'PKxx<html>"):
        fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", progress=False)


def test_a_login_page_under_a_pinned_checksum_is_named_not_retried_or_offered_for_pinning(server, tmp_path):
    """The checksum catches the page, but "a broken transfer: run again" got the same page again, and
    accepting its checksum with --hash ended in "not a readable zip archive": a loop."""
    server.files["/Dataset_BUSI.zip"] = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
    with pytest.raises(HashMismatchError) as error:
        fetch("busi", dest=tmp_path, url=server.url + "/Dataset_BUSI.zip", progress=False)
    message = str(error.value)
    assert "not a zip archive but begins b'<!DOCTYPE html><html><body>Please sign" in message
    assert "the host sent an error or login page" in message and "in a browser" in message
    assert "--url file:///path/to/Dataset_BUSI.zip" in message
    assert "run again to retry" not in message and "--hash" not in message


def test_a_login_page_saved_as_an_npz_is_named_as_such(server, tmp_path):
    """An .npz is a zip too: the page was called "a broken transfer: run again", and offered for --hash."""
    server.files["/breastmnist.npz"] = b"  <html><body>Please sign in</body></html>"
    with pytest.raises(HashMismatchError) as error:
        fetch("breastmnist", dest=tmp_path, url=server.url + "/breastmnist.npz", progress=False)
    message = str(error.value)
    assert "not a zip archive but begins b'  <html>" in message and "the host sent an error or login page" in message
    assert "run again to retry" not in message and "--hash" not in message


def _patched_zip(tmp_path, method: int | None = None, encrypted: bool = False):
    """A zip whose headers say `method` (9: Deflate64) or encryption, as zipfile would read them."""
    data = bytearray(zip_bytes({"BUSBRA/bus_data.csv": b"ID,Case,Pathology\n", "BUSBRA/readme.txt": b"r"}))
    for signature, method_at, flags_at in ((b"PK\x03\x04", 8, 6), (b"PK\x01\x02", 10, 8)):
        start = data.find(signature)
        while start >= 0:
            if method is not None:
                data[start + method_at:start + method_at + 2] = method.to_bytes(2, "little")
            if encrypted:
                data[start + flags_at] |= 0x1
            start = data.find(signature, start + 4)
    path = tmp_path / "data.zip"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("method, encrypted, message", [
    (9, False, r"uses compression method 9 \(e\.g\. Deflate64.*nothing was extracted. Unpack it with 7-Zip"),
    (None, True, r"is encrypted \(password-protected\).*nothing was extracted"),
])
def test_a_zip_python_cannot_read_is_refused_before_unpacking(tmp_path, method, encrypted, message):
    """NotImplementedError or RuntimeError came out of extractall as a traceback, half the archive written."""
    from data_fetch.archive import extract_zip

    with pytest.raises(data_fetch.FetchError, match=message):
        extract_zip(_patched_zip(tmp_path, method, encrypted), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_an_empty_dest_is_refused_not_taken_for_the_working_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["busi", "--dest", "", "--quiet"]) == 1  # it unpacked into "." (and its advice said --dest ".")
    assert "dest is empty; name a folder for the dataset, or leave it out for the default" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dest is empty"):
        fetch("busi", dest=" ", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_command_line_says_to_fix_mtlearn_data_when_no_dest_was_given(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MTLEARN_DATA", str(blocker))
    assert main(["busi", "--quiet"]) == 1
    assert f"({blocker} is a file, not a folder); set MTLEARN_DATA to a folder, or pass --dest" in \
        capsys.readouterr().err


def test_a_zip_cut_short_without_a_checksum_is_called_cut_short_not_a_login_page(server, tmp_path):
    server.files["/uclm.zip"] = zip_bytes({"BUS-UCLM/INFO.csv": b"x" * 5000})[:-60]  # no central directory
    with pytest.raises(DownloadError, match=r"begins like a zip archive but is cut short \(the transfer stopped "
                                            r"early\?\); it was kept as .*\.not-a-zip: delete it and run again"):
        fetch("bus_uclm", dest=tmp_path, url=server.url + "/uclm.zip", progress=False)


# SPEC section 4, copied by hand: a typo in sources.py must not pass unnoticed.
SPEC_SOURCES = [
    ("busi", "https://scholar.cu.edu.eg/Dataset_BUSI.zip",
     "sha256:b2ce09f6063a31a73f628b6a6ee1245187cbaec225e93e563735691d68654de7"),
    ("busi_128", "https://zenodo.org/records/13358372/files/busi_128.npz?download=1",
     "md5:68877751adef0ab639de73946aac0985"),
    ("busi_256", "https://zenodo.org/records/13358372/files/busi_256.npz?download=1",  # SPEC: "(also _256, _512)"
     "md5:198aea70968b71adf593b32c41a6e995"),
    ("bus_bra", "https://zenodo.org/records/8231412/files/BUSBRA.zip?download=1",
     "md5:1f8b2be6476d58fc97bfb5e5a1ea9bab"),
    ("bus_uclm", "https://prod-dcd-datasets-cache-zipfiles.s3.eu-west-1.amazonaws.com/7fvgj4jsp7-1.zip", None),
    ("breastmnist", "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
     "md5:750601b1f35ba3300ea97c75c52ff8f6"),
    ("breastmnist_224", "https://zenodo.org/records/10519652/files/breastmnist_224.npz?download=1",  # "(and _224)"
     "md5:b56378a6eefa9fed602bb16d192d4c8b"),
]


def test_sources_match_the_spec():
    assert [(s.name, s.url, s.known_hash) for s in data_fetch.SOURCES.values()] == SPEC_SOURCES
    # SPEC: BUSI's sha256 is "pinned by another project; not official", and its host's TLS is unreliable
    assert [s.name for s in data_fetch.SOURCES.values() if not s.hash_is_official] == ["busi"]
    assert [s.name for s in data_fetch.SOURCES.values() if s.host_unreliable] == ["busi"]


def test_resolutions_sharing_a_folder_keep_their_own_files(server, tmp_path, monkeypatch):
    """breastmnist and breastmnist_224 (busi_128 and busi_256 too) go to one folder: neither clobbers or
    blocks the other, and the loader finds each under its own name."""
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path))
    names = ["breastmnist", "breastmnist_224", "busi_128", "busi_256"]
    assert data_fetch.dataset_dir("breastmnist") == data_fetch.dataset_dir("breastmnist_224")
    assert data_fetch.dataset_dir("busi_128") == data_fetch.dataset_dir("busi_256")
    for name in names:
        server.files[f"/{name}"] = name.encode() * 100
        fetch(name, url=f"{server.url}/{name}", known_hash=sha256(name.encode() * 100), progress=False)
    for name in names:
        assert (data_fetch.dataset_dir(name) / data_fetch.SOURCES[name].filename).read_bytes() == name.encode() * 100


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def test_unreachable_host_prints_manual_instructions(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/BUSBRA.zip"
    code = main(["bus_bra", "--dest", str(tmp_path), "--url", url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert url in err and "1f8b2be6476d58fc97bfb5e5a1ea9bab" in err  # where from, what checksum
    assert str(tmp_path / "BUSBRA.zip") in err and "python -m data_fetch bus_bra" in err  # where to put it
    assert not (tmp_path / "BUSBRA.zip").exists()


def test_the_manual_curl_command_makes_the_folder_it_writes_to(tmp_path):
    """fetch removes the folder it made when the download fails: the printed curl must create it again."""
    source = data_fetch.SOURCES["bus_bra"]
    message = data_fetch.manual_instructions(source, source.url, source.known_hash, tmp_path / "gone")
    assert f'curl -L --create-dirs -o "{tmp_path / "gone" / "BUSBRA.zip"}"' in message
    assert "(make the folder if it is not there)" in message


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_fetch.__main__, "fetch", interrupted)
    assert main(["bus_bra", "--quiet"]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err


def test_sigterm_says_how_to_resume(monkeypatch, capsys):
    """SIGTERM (a scheduler's pre-emption, `kill`) ended a download without a word: now as Ctrl-C, status 143."""
    def terminated(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM ends data_fetch silently"
        signal.raise_signal(signal.SIGTERM)  # (with no handler, SIGTERM would end the test session)

    monkeypatch.setattr(data_fetch.__main__, "fetch", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["bus_bra", "--quiet"]) == 143
    assert "data_fetch: terminated (SIGTERM); run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # put back: main() is called in-process (tests, a notebook)


def test_a_sigterm_handler_set_outside_python_gives_way_to_the_default_after_a_fetch(sigterm_handler_set_in_c,
                                                                                     monkeypatch, tmp_path):
    """signal.signal answers None for a handler that C code set; handing None back raised TypeError at the end."""
    monkeypatch.setattr(data_fetch.__main__, "fetch", lambda *args, **kwargs: tmp_path)
    assert main(["bus_bra", "--quiet"]) == 0
    assert sigterm_handler_set_in_c == [sigterm_handler_set_in_c[0], signal.SIG_DFL]  # not None: TypeError


@pytest.mark.parametrize("name, url, suggested", [("busi", None, True), ("busi", "https://mirror.example/b.zip", False),
                                                  ("bus_bra", None, False)])
def test_unreliable_host_suggests_a_mirror(tmp_path, name, url, suggested):
    """BUSI's host has unreliable TLS: a curl against it is likely to fail too. Not said of a chosen mirror."""
    source = data_fetch.SOURCES[name]
    message = data_fetch.manual_instructions(source, url or source.url, source.known_hash, tmp_path, reason="timed out")
    assert (f'python -m data_fetch {name} --dest "{tmp_path}" --url <mirror URL>' in message) == suggested


def test_a_local_copy_is_fetched_from_a_file_url(tmp_path):
    """A mirror on a shared drive (a cluster without internet): file:// goes through the same checks."""
    copy = tmp_path / "mirror" / "breastmnist.npz"
    copy.parent.mkdir()
    copy.write_bytes(b"a pretend archive")
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    folder = fetch("breastmnist", dest=tmp_path / "data", url=copy.as_uri(), known_hash=f"sha256:{digest}",
                   progress=False)
    assert (folder / "breastmnist.npz").read_bytes() == b"a pretend archive"


@pytest.mark.parametrize("where, says", [("nope.npz", "there is no such file: "), ("", " is a folder; give the path")])
def test_a_wrong_local_copy_is_not_retried_and_says_what_is_wrong(tmp_path, monkeypatch, where, says):
    """A mistyped file:// path stays wrong however often it is read: no retries (30 s with the real backoff),
    and no advice to open it in a browser or with curl. The dataset folder it made is removed again."""
    slept = []
    monkeypatch.setattr(data_fetch.download.time, "sleep", slept.append)
    (tmp_path / "mirror").mkdir()
    url = (tmp_path / "mirror" / where).as_uri()
    with pytest.raises(DownloadError) as error:
        fetch("breastmnist", dest=tmp_path / "data", url=url, progress=False)
    message = str(error.value)
    assert slept == [] and says in message and "browser" not in message and "curl" not in message
    assert "%23" not in message  # the hint on '#' is for a path that holds one
    assert f"copy the file to {tmp_path / 'data' / 'breastmnist.npz'}" in message
    assert not (tmp_path / "data").exists()


def test_a_local_copy_whose_path_holds_a_hash_is_told_how_to_write_it(tmp_path):
    """file:///.../Course #1/x.npz said only "no such file: .../Course " (the rest was read as a fragment)."""
    (tmp_path / "Course #1").mkdir()
    (tmp_path / "Course #1" / "breastmnist.npz").write_bytes(b"a copy")
    meant = (tmp_path / "Course #1" / "breastmnist.npz").as_uri()
    assert "%231" in meant
    with pytest.raises(DownloadError, match=re.escape(f"no such file: {tmp_path}/Course ; check the path (the URL "
                                                      "holds the file's absolute path); in a URL '#' ends the path: "
                                                      f"write it %23, e.g. {meant}")):
        fetch("breastmnist", dest=tmp_path / "data", url=f"file://{tmp_path}/Course #1/breastmnist.npz",
              progress=False)
    folder = fetch("breastmnist", dest=tmp_path / "data", url=(tmp_path / "Course #1" / "breastmnist.npz").as_uri(),
                   known_hash=f"sha256:{hashlib.sha256(b'a copy').hexdigest()}", progress=False)
    assert (folder / "breastmnist.npz").read_bytes() == b"a copy"  # written so, the same path is read


def test_a_certificate_that_fails_verification_is_not_retried(tmp_path, monkeypatch):
    """An expired or self-signed certificate is the same on every attempt (unlike a handshake cut short).
    A real TLS server on 127.0.0.1 with a self-signed certificate, made by the openssl command."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-days", "2",
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # self-signed: no client trusts it
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.files, httpd.requests, httpd.errors = {"/data.npz": PAYLOAD}, [], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    slept = []
    monkeypatch.setattr(data_fetch.download.time, "sleep", slept.append)
    try:
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            download_file(f"https://127.0.0.1:{httpd.server_address[1]}/data.npz", tmp_path / "data.npz",
                          progress=False, retries=3)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert slept == [] and httpd.requests == []


def test_a_failed_fetch_leaves_no_empty_folder(tmp_path):
    """An empty dataset folder would look downloaded: the loader would report a missing file instead of
    "not downloaded" and the command that fetches it. A folder that was there before stays."""
    from mtlearn.data import load_dataset

    url = f"http://127.0.0.1:{closed_port()}/breastmnist.npz"
    with pytest.raises(DownloadError):
        fetch("breastmnist", dest=tmp_path / "new" / "breastmnist", url=url, progress=False, retries=0)
    assert not (tmp_path / "new" / "breastmnist").exists()
    with pytest.raises(FileNotFoundError, match="breastmnist is not downloaded.*python -m data_fetch breastmnist"):
        load_dataset("breastmnist", root=tmp_path / "new" / "breastmnist")
    (tmp_path / "mine").mkdir()
    with pytest.raises(DownloadError):
        fetch("breastmnist", dest=tmp_path / "mine", url=url, progress=False, retries=0)
    assert (tmp_path / "mine").is_dir()


def test_manually_placed_file_with_wrong_hash_is_reported_not_deleted(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"something else")
    with pytest.raises(HashMismatchError, match="expected md5:750601b1f35ba3300ea97c75c52ff8f6.*delete"):
        fetch("breastmnist", dest=tmp_path, progress=False)
    assert (tmp_path / "breastmnist.npz").exists()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: fetch("isic", dest=d), "unknown dataset 'isic'.*busi"),
        (lambda d: fetch("busi", dest=d, known_hash="crc32:1234"), "checksum"),
        (lambda d: parse_hash("sha256:not-hex"), "checksum"),
        (lambda d: parse_hash("md5:abc"), "has 3 hex digits; a md5 digest has 32"),
        (lambda d: parse_hash("sha256:" + "z" * 64), r"cannot read the checksum"),  # the right length, no hex
        (lambda d: parse_hash("sha256:" + "0" * 32), "has 32 hex digits; a sha256 digest has 64"),
        (lambda d: fetch("bus_bra", dest=d, known_hash="md5:" + "0" * 64), "a md5 digest has 32"),
        (lambda d: fetch("breastmnist", dest=d, url="notaurl"), r"url 'notaurl' is not a web address; .*https://"),
        (lambda d: fetch("breastmnist", dest=d, url="zenodo.org/records/1/breastmnist.npz"), "not a web address"),
        (lambda d: fetch("breastmnist", dest=d, url="https:/zenodo.org/records/1/breastmnist.npz"), "not a web addr"),
        # no path: refused up front, not read as the current folder
        (lambda d: fetch("breastmnist", dest=d, url="file://"), r"url 'file://' is not a web address; .*file://"),
        # urllib's InvalidURL was retried five times (about 30 s), then blamed on the host
        (lambda d: fetch("breastmnist", dest=d, url="http://127.0.0.1:80a/x.npz"), "port that is no number"),
        (lambda d: fetch("breastmnist", dest=d, url="https://h.org/Dataset BUSI.zip"), r"holds a space.*%20"),
        (lambda d: fetch("breastmnist", dest=d, url="https://h.org/busi\x7f.zip"), r"holds a space or a control"),
        (lambda d: fetch("breastmnist", dest=d / "x", retries=-1), r"retries must be an integer >= 0.*got -1"),
        (lambda d: fetch("breastmnist", dest=d / "x", retries=2.0), r"got 2.0; pass an int, e.g. int\(\.\.\.\)"),
        (lambda d: fetch("breastmnist", dest=d / "x", retries=True), "retries must be an integer"),
        (lambda d: download_file("file:///nope", d / "x.npz", retries=-1), "retries must be an integer >= 0"),
    ],
)
def test_bad_arguments(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_an_ftp_address_is_a_web_address(tmp_path, monkeypatch):
    """Mirrors may serve over FTP: the address is accepted and tried (nothing listens here, so the host fails)."""
    for proxy in ("ftp_proxy", "FTP_PROXY", "all_proxy", "ALL_PROXY"):  # straight to 127.0.0.1, not via a proxy
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(DownloadError, match="could not download"):
        fetch("breastmnist", dest=tmp_path, url="ftp://127.0.0.1:9/breastmnist.npz", retries=0, progress=False)


def test_an_invalid_address_is_not_retried(tmp_path, capsys):
    """download_file alone (fetch refuses it up front): asking again gets the same InvalidURL."""
    with pytest.raises(DownloadError, match="InvalidURL"):
        download_file("http://127.0.0.1:1/a b.npz", tmp_path / "x.npz", progress=False)
    assert "retrying" not in capsys.readouterr().err


def test_the_bytes_compared_on_resume_are_read_whole_from_a_response_that_trickles():
    """One read() may return less than asked (a slow connection): the comparison needs them all."""
    from data_fetch.download import _read_exactly

    class Trickle:
        def __init__(self, data):
            self.data = data

        def read(self, n):
            chunk, self.data = self.data[: min(n, 1000)], self.data[min(n, 1000):]
            return chunk

    assert _read_exactly(Trickle(PAYLOAD), OVERLAP_BYTES) == PAYLOAD[:OVERLAP_BYTES]
    trickle = Trickle(PAYLOAD[:5000])
    assert _read_exactly(trickle, OVERLAP_BYTES) == PAYLOAD[:OVERLAP_BYTES] and trickle.data == PAYLOAD[4096:5000]
    assert _read_exactly(Trickle(PAYLOAD[:2500]), OVERLAP_BYTES) == PAYLOAD[:2500]  # the file ends first


def test_a_local_path_with_a_space_is_a_valid_address(tmp_path):
    source = tmp_path / "my data" / "breastmnist.npz"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    folder = fetch("breastmnist", dest=tmp_path / "dest", url=f"file://{source}", known_hash=sha256(PAYLOAD),
                   progress=False)
    assert (folder / "breastmnist.npz").read_bytes() == PAYLOAD


def test_checksums_bare_or_in_capitals_are_read():
    """A digest copied from a web page: without the algorithm (told by its length) or in capitals."""
    md5, sha = "68877751ADEF0AB639DE73946AAC0985", "B2CE09F6063A31A73F628B6A6EE1245187CBAEC225E93E563735691D68654DE7"
    assert parse_hash(md5) == ("md5", md5.lower()) and parse_hash(sha) == ("sha256", sha.lower())
    assert parse_hash(f"SHA256:{sha}") == ("sha256", sha.lower()) and parse_hash(f" md5:{md5} ") == ("md5", md5.lower())


def test_default_data_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path))
    assert data_fetch.default_data_dir() == tmp_path and data_fetch.dataset_dir("busi_256") == tmp_path / "busi_npz"
    monkeypatch.delenv("MTLEARN_DATA")
    assert data_fetch.default_data_dir().name == "mtlearn"


def test_a_home_folder_in_mtlearn_data_or_dest_is_expanded(server, tmp_path, monkeypatch):
    # "~" is written in a shell profile or a notebook, where no shell expands it: a folder named "~" would appear
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # where Windows looks for "~"
    monkeypatch.setenv("MTLEARN_DATA", "~/data")
    assert data_fetch.default_data_dir() == tmp_path / "data"
    server.files["/breastmnist.npz"] = PAYLOAD
    monkeypatch.chdir(tmp_path)  # a "~" folder would land here
    folder = fetch("breastmnist", dest="~/d", url=server.url + "/breastmnist.npz", known_hash=sha256(PAYLOAD),
                   progress=False)
    assert folder == tmp_path / "d" and (tmp_path / "d" / "breastmnist.npz").read_bytes() == PAYLOAD
    assert not (tmp_path / "~").exists()


def test_an_empty_mtlearn_data_means_the_default_not_the_current_folder(monkeypatch):
    # `export MTLEARN_DATA=` (unset by hand) must not scatter datasets into whatever folder Python runs in
    monkeypatch.setenv("MTLEARN_DATA", "")
    assert data_fetch.default_data_dir().name == "mtlearn" and data_fetch.default_data_dir().is_absolute()


def test_command_line_prints_a_path_the_console_cannot_spell_escaped(tmp_path, monkeypatch, cp1252_stdout):
    """Windows writes cp1252 to a file or pipe: `list` under a data root named Łukasz ended in a traceback."""
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path / "Łukasz"))
    printed = cp1252_stdout()
    assert main(["list"]) == 0
    assert f"{tmp_path}{os.sep}\\u0141ukasz" in printed()


def test_command_line_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in data_fetch.SOURCES) and "md5:1f8b2be6476d58fc97bfb5e5a1ea9bab" in out
    # BUSI's checksum is not the publisher's (SPEC): the listing says so, and only for BUSI
    busi = data_fetch.SOURCES["busi"].known_hash
    assert f"{busi} (pinned by another project, not by the publisher)" in out and out.count("pinned by another") == 1
    result = subprocess.run([sys.executable, "-m", "data_fetch", "--help"], capture_output=True, text=True, check=True)
    assert "--dest" in result.stdout and "--hash" in result.stdout and "bus_uclm" in result.stdout


def test_the_listing_read_only_in_part_ends_quietly():
    """`python -m data_fetch list | head` ended with a BrokenPipeError traceback once head had what it wanted."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before anything is written
    try:
        result = subprocess.run([sys.executable, "-m", "data_fetch", "list"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == ""


def test_command_line_names_an_unwritable_destination(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["busi", "--dest", str(blocker / "busi"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write to {blocker / 'busi'} ({blocker} is a file, not a folder); choose another --dest" in err
    assert main(["busi", "--dest", str(blocker), "--quiet"]) == 1  # was "(File exists)"
    assert f"({blocker} is a file, not a folder); choose another --dest" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_command_line_quiet_hides_the_progress_bar(server, tmp_path, capsys):
    server.files["/breastmnist.npz"] = PAYLOAD
    args = ["breastmnist", "--url", server.url + "/breastmnist.npz", "--hash", sha256(PAYLOAD)]
    assert main([*args, "--dest", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert main([*args, "--dest", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert "100%" in loud.err and "100%" not in quiet.err
    assert f"breastmnist is ready in {tmp_path / 'quiet'}" in quiet.out  # where the data went


@pytest.mark.parametrize("option, says", [("--hash=crc32:1234", "cannot read the checksum 'crc32:1234'"),
                                           ("--url=zenodo.org/BUSBRA.zip", "is not a web address")])
def test_command_line_bad_option_is_a_message_not_a_traceback(tmp_path, capsys, option, says):
    assert main(["bus_bra", "--dest", str(tmp_path), option, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("data_fetch: ") and says in err


def test_command_line_unknown_dataset_is_a_usage_error_naming_the_choices(capsys):
    """A typo in the name is a usage error (exit 2, before anything is touched), not a failed download (1)."""
    with pytest.raises(SystemExit) as exit_:
        main(["isic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown dataset 'isic'" in err and all(name in err for name in data_fetch.SOURCES)
    with pytest.raises(SystemExit) as exit_:  # load_dataset's name: argparse's "invalid choice" named no way on
        main(["busi_npz"])
    assert exit_.value.code == 2 and "of busi_128 and busi_256: fetch one of those" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "required: NAME (a dataset, or 'list')" in capsys.readouterr().err
    assert main(["--list"]) == 0 and "busi_128" in capsys.readouterr().out  # as `list`


# ------------------------------------------------------------------------------------------ review of 2026-12-04


def test_a_repair_cut_short_leaves_no_completion_marker(server, tmp_path, monkeypatch):
    """Re-unpacking after a deleted file wrote over the folder under the old marker: cut short, a half
    written image stayed marked complete, and every later fetch returned at once."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "known_hash": sha256(ARCHIVE), "progress": False}
    fetch("bus_bra", **kwargs)
    (tmp_path / "BUSBRA" / "bus_data.csv").unlink()

    def cut_short(archive, target, replaceable, started, reserved):
        started()  # its checks passed
        (target / "BUSBRA" / "Images" / "bus_0001-l.png").write_bytes(b"p")  # half of "png"
        raise KeyboardInterrupt

    monkeypatch.setattr(data_fetch, "extract_zip", cut_short)
    with pytest.raises(KeyboardInterrupt):
        fetch("bus_bra", **kwargs)
    assert not (tmp_path / ".bus_bra.complete").exists()
    monkeypatch.undo()
    monkeypatch.setattr(data_fetch.download, "BACKOFF_SECONDS", 0.0)
    fetch("bus_bra", **kwargs)  # unpacks again
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png"
    assert (tmp_path / ".bus_bra.complete").exists()


def test_unpacking_never_replaces_a_users_own_file_with_other_contents(server, tmp_path, capsys):
    """--dest may name a folder that holds other things: a file there with a member's name was overwritten."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "known_hash": sha256(ARCHIVE), "progress": False}
    (tmp_path / "BUSBRA").mkdir()
    (tmp_path / "BUSBRA" / "bus_data.csv").write_bytes(b"my own notes")
    with pytest.raises(data_fetch.WouldReplaceError, match=r"would replace 1 file\(s\) there that hold something "
                                                          r"else \(BUSBRA/bus_data.csv\); nothing was extracted"):
        fetch("bus_bra", **kwargs)
    assert (tmp_path / "BUSBRA" / "bus_data.csv").read_bytes() == b"my own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BUSBRA", "BUSBRA.zip"]  # no image, marker or record
    assert main(["bus_bra", "--dest", str(tmp_path), "--url", kwargs["url"], "--hash", kwargs["known_hash"],
                 "--quiet"]) == 1
    assert "move those files away first" in capsys.readouterr().err
    (tmp_path / "BUSBRA" / "bus_data.csv").write_bytes(b"ID,Case,Pathology\n")  # the archive's own contents:
    fetch("bus_bra", **kwargs)  # nothing to lose
    assert (tmp_path / ".bus_bra.complete").is_file() and not (tmp_path / ".bus_bra.unpacking").exists()


def test_a_refused_unpacking_keeps_the_marker_of_the_last_fetch(server, tmp_path):
    """The marker went before the checks: refused, the folder lost the record of which files were the dataset's,
    and the next fetch then refused the dataset's own files as a user's."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    url = server.url + "/BUSBRA.zip"
    fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
    (tmp_path / "BUSBRA" / "bus_data.csv").write_bytes(b"edited")  # the dataset's own file, changed
    (tmp_path / "BUSBRA" / "notes.txt").write_bytes(b"mine")  # and a file of the user's
    newer = zip_bytes({"BUSBRA/bus_data.csv": b"ID,Case,Pathology,Histology\n", "BUSBRA/notes.txt": b"readme"})
    server.files["/BUSBRA.zip"] = newer
    (tmp_path / "BUSBRA.zip").unlink()  # so that the newer archive is downloaded
    with pytest.raises(data_fetch.WouldReplaceError, match=r"\(BUSBRA/notes.txt\)"):  # not bus_data.csv
        fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(newer), progress=False)
    assert (tmp_path / ".bus_bra.complete").is_file() and not (tmp_path / ".bus_bra.unpacking").exists()
    (tmp_path / "BUSBRA" / "notes.txt").unlink()  # moved away, as the message says
    fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(newer), progress=False)
    assert (tmp_path / "BUSBRA" / "bus_data.csv").read_bytes() == b"ID,Case,Pathology,Histology\n"


def test_a_zip_inside_the_download_does_not_replace_a_users_file_either(tmp_path):
    outer = tmp_path / "outer.zip"
    outer.write_bytes(zip_bytes({"data/inner.zip": zip_bytes({"a.png": b"png"}), "data/b.png": b"png"}))
    (tmp_path / "dest" / "data").mkdir(parents=True)
    (tmp_path / "dest" / "data" / "a.png").write_bytes(b"pnG")  # the member's size, not its contents
    started = []  # whether b.png was there when `started` was called
    with pytest.raises(data_fetch.WouldReplaceError, match=r"\(data/a.png\)"):
        data_fetch.extract_zip(outer, tmp_path / "dest", started=lambda: started.append(None))
    assert [p.name for p in (tmp_path / "dest" / "data").iterdir()] == ["a.png"] and started == []
    assert (tmp_path / "dest" / "data" / "a.png").read_bytes() == b"pnG"
    names = data_fetch.extract_zip(outer, tmp_path / "dest", replaceable=["data/a.png"],  # as its own unpacking
                                   started=lambda: started.append((tmp_path / "dest" / "data" / "b.png").exists()))
    assert "data/a.png" in names and (tmp_path / "dest" / "data" / "a.png").read_bytes() == b"png"
    assert started == [False]  # once, before the first byte was written


def test_a_repair_replaces_the_dataset_files_of_the_last_fetch_and_a_first_unpacking_cut_short_its_own(
        server, tmp_path, monkeypatch):
    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "known_hash": sha256(ARCHIVE), "progress": False}
    fetch("bus_bra", **kwargs)
    (tmp_path / "BUSBRA" / "bus_data.csv").write_bytes(b"edited")  # a file of the dataset, changed
    (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").unlink()
    fetch("bus_bra", **kwargs)  # the marker lists both: restored
    assert (tmp_path / "BUSBRA" / "bus_data.csv").read_bytes() == b"ID,Case,Pathology\n"
    assert (tmp_path / "BUSBRA" / "Images" / "bus_0001-l.png").read_bytes() == b"png"

    fresh = tmp_path / "fresh"
    extract_zip = data_fetch.extract_zip

    def cut_short(archive, target, replaceable, started, reserved):
        started()
        (target / "BUSBRA").mkdir(parents=True)
        (target / "BUSBRA" / "bus_data.csv").write_bytes(b"ID,")  # half written; no marker yet
        raise KeyboardInterrupt

    monkeypatch.setattr(data_fetch, "extract_zip", cut_short)
    with pytest.raises(KeyboardInterrupt):
        fetch("bus_bra", **{**kwargs, "dest": fresh})
    assert (fresh / ".bus_bra.unpacking").exists() and not (fresh / ".bus_bra.complete").exists()
    monkeypatch.setattr(data_fetch, "extract_zip", extract_zip)
    fetch("bus_bra", **{**kwargs, "dest": fresh})  # its own half-written file: replaced, not refused
    assert (fresh / "BUSBRA" / "bus_data.csv").read_bytes() == b"ID,Case,Pathology\n"
    assert (fresh / ".bus_bra.complete").is_file() and not (fresh / ".bus_bra.unpacking").exists()


def _link_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        link = zipfile.ZipInfo("BUSBRA/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc")
        zf.writestr("BUSBRA/link/x.png", b"png")
    return buffer.getvalue()


@pytest.mark.parametrize("archive, says", [
    (_link_zip(), "member 'BUSBRA/link' is a symbolic link"),
    (zip_bytes({"BUSBRA/a": b"file", "BUSBRA/a/b.png": b"png"}), "member 'BUSBRA/a' is a file and also the folder"),
    # a folder entry of the file's name, before or after it: failed halfway, blaming the destination
    (zip_bytes({"BUSBRA/a": b"file", "BUSBRA/a/": b""}), "member 'BUSBRA/a' is a file and also the folder"),
    (zip_bytes({"BUSBRA/a/": b"", "BUSBRA/a": b"file"}), "member 'BUSBRA/a' is a file and also the folder"),
    # inside a wrapped zip: caught only after the outer archive was unpacked
    (zip_bytes({"data/inner.zip": _link_zip()}), r"inner.zip \(inside BUSBRA.zip\): member 'BUSBRA/link' is a"),
])
def test_links_and_files_that_are_also_folders_are_refused_before_anything_is_written(tmp_path, archive, says):
    """zipfile writes a link as a small file, so the member under it failed halfway (NotADirectoryError) and
    the command line blamed the destination folder."""
    path = tmp_path / "BUSBRA.zip"
    path.write_bytes(archive)
    with pytest.raises(UnsafeArchiveError, match=says):
        data_fetch.extract_zip(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_zip_with_folder_entries_is_unpacked(tmp_path):
    # most zip tools write "d/" before "d/a.png": a folder entry is no file that is also a folder
    path = tmp_path / "BUSBRA.zip"
    path.write_bytes(zip_bytes({"BUSBRA/": b"", "BUSBRA/Images/": b"", "BUSBRA/Images/a.png": b"png"}))
    data_fetch.extract_zip(path, tmp_path / "out")
    assert (tmp_path / "out" / "BUSBRA" / "Images" / "a.png").read_bytes() == b"png"


def test_partial_content_from_the_middle_is_dropped_and_asked_for_again(server, tmp_path):
    """A 206 starting neither where the .part file ends nor at 0 was saved as the whole file, failed its
    checksum and was kept as .mismatch with the advice to run again."""
    server.files["/data.npz"] = PAYLOAD
    server.drops, server.range_start = 1, 500
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert [r for _, r, _ in server.requests] == [None, resume_at(len(PAYLOAD) // 3), None]
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not list(tmp_path.glob("*.mismatch"))


def test_partial_content_without_content_range(server, tmp_path):
    """A 206 naming no range: the whole file when nothing was asked by range (it failed: the absent .part
    file was deleted), and bytes from an unknown place when a resume was asked (dropped, asked again)."""
    server.files["/data.npz"] = PAYLOAD
    server.bare_206 = True
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and len(server.requests) == 1
    server.drops = 1
    download_file(server.url + "/data.npz", tmp_path / "again.npz", sha256(PAYLOAD), progress=False)
    assert [r for _, r, _ in server.requests[1:]] == [None, resume_at(len(PAYLOAD) // 3), None]
    assert (tmp_path / "again.npz").read_bytes() == PAYLOAD


@pytest.mark.parametrize("asked, waited", [("7", 7.0), ("1000", 120.0), ("Fri, 04 Dec 2026 23:59:00 GMT", 2.0)])
def test_a_servers_retry_after_sets_the_wait(server, tmp_path, monkeypatch, capsys, asked, waited):
    slept = []
    monkeypatch.setattr(data_fetch.download, "BACKOFF_SECONDS", 2.0)
    monkeypatch.setattr(data_fetch.download.time, "sleep", slept.append)
    server.files["/data.npz"] = PAYLOAD
    server.errors, server.retry_after = [429], asked
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert slept == [waited]  # capped at two minutes; a date is not parsed: the usual backoff
    assert capsys.readouterr().err.strip().endswith(f"retrying in {waited:g} s")


def test_a_local_copy_with_another_checksum_is_not_blamed_on_the_transfer(tmp_path):
    copy = tmp_path / "mirror" / "breastmnist.npz"
    copy.parent.mkdir()
    copy.write_bytes(b"another file")
    with pytest.raises(HashMismatchError) as error:
        fetch("breastmnist", dest=tmp_path / "data", url=copy.as_uri(), known_hash="sha256:" + "0" * 64,
              progress=False)
    assert "point --url at the right file" in str(error.value) and "run again" not in str(error.value)


def test_every_request_asks_for_the_files_own_bytes(server, tmp_path, monkeypatch):
    # http.client adds "Accept-Encoding: identity" on its own, so the server alone cannot tell: the request must
    # say it (a proxy or another handler would otherwise be free to ask for gzip)
    asked, urlopen = [], urllib.request.urlopen

    def recording(request, **kwargs):
        asked.append(request)
        return urlopen(request, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", recording)
    server.files["/data.npz"] = PAYLOAD
    server.drops = 1  # and the resumed request too
    download_file(server.url + "/data.npz", tmp_path / "data.npz", sha256(PAYLOAD), progress=False)
    assert len(asked) == 2 and all(r.get_header("Accept-encoding") == "identity" for r in asked)


def test_a_corrupted_repair_download_under_the_official_pin_says_to_run_again(server, tmp_path, monkeypatch):
    # the marker records the pinned (official) checksum: a bad download is a broken transfer, not a mirror's archive
    pinned = dataclasses.replace(data_fetch.get_source("bus_bra"), known_hash=sha256(ARCHIVE))
    monkeypatch.setitem(data_fetch.SOURCES, "bus_bra", pinned)
    server.files["/BUSBRA.zip"] = ARCHIVE
    url = server.url + "/BUSBRA.zip"
    fetch("bus_bra", dest=tmp_path, url=url, progress=False)
    (tmp_path / "BUSBRA" / "bus_data.csv").unlink()
    (tmp_path / "BUSBRA.zip").unlink()
    server.files["/BUSBRA.zip"] = zip_bytes({"BUSBRA/bus_data.csv": b"garbled"})
    with pytest.raises(HashMismatchError) as error:
        fetch("bus_bra", dest=tmp_path, url=url, progress=False)
    message = str(error.value)
    assert "run again to retry" in message and "recorded in" not in message and "--url" not in message


class Scripted(BaseHTTPRequestHandler):
    """Answers the n-th request with server.answers[n] (the last one for every later request): a function
    (handler, data, start) -> None that writes the whole response; `start` is where the Range header asks."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        answer = server.answers[min(len(server.requests), len(server.answers)) - 1]
        start = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
        answer(self, server.data, start)

    def log_message(self, *args):
        pass


def _send(handler, status, body, headers=(), cut=None):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body[:cut])
    handler.wfile.flush()
    handler.close_connection = True


def honest(handler, data, start):
    """A server that does ranges right."""
    if start:
        _send(handler, 206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"),
                                           ("Content-Length", str(len(data) - start))])
    else:
        _send(handler, 200, data, [("Content-Length", str(len(data)))])


@pytest.fixture
def scripted():
    with serving(Scripted) as httpd:
        httpd.requests, httpd.data, httpd.answers = [], PAYLOAD, [honest]
        httpd.url += "/data.npz"
        yield httpd


def _half_downloaded(tmp_path) -> int:
    (tmp_path / "data.npz.part").write_bytes(PAYLOAD[:60_000])
    return 60_000


def test_a_resume_cut_off_within_its_check_bytes_keeps_the_partial_download(scripted, tmp_path):
    """Dropped after 1,000 of the 4,096 bytes compared with the .part file's end: taken for another version of
    the file, the partial download was deleted and everything fetched again."""
    size = _half_downloaded(tmp_path)

    def cut(handler, data, start):
        _send(handler, 206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"),
                                           ("Content-Length", str(len(data) - start))], cut=1000)

    scripted.answers = [cut, honest]
    download_file(scripted.url, tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=1)
    assert scripted.requests == [resume_at(size), resume_at(size)]  # resumed again, not from the start
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD


def test_a_web_page_in_answer_to_a_range_request_keeps_the_partial_download(scripted, tmp_path):
    """A 200 page (a rate-limit notice) replaced the .part file, which then failed its checksum as .mismatch."""
    size = _half_downloaded(tmp_path)
    page = b"<html>Too many requests, try later</html>"
    scripted.answers = [lambda h, d, s: _send(h, 200, page, [("Content-Type", "text/html; charset=utf-8"),
                                                             ("Content-Length", str(len(page)))]), honest]
    download_file(scripted.url, tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=1)
    assert scripted.requests == [resume_at(size), resume_at(size)]
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD and not (tmp_path / "data.npz.mismatch").exists()


def test_range_answers_capped_by_the_host_are_resumed_until_the_file_is_whole(scripted, tmp_path):
    """bytes 55904-105903/... of a 102,400-byte file was taken as the whole rest: a .mismatch with a checksum, a
    file cut short without one."""
    size = _half_downloaded(tmp_path)

    def capped(handler, data, start):
        end = min(start + 30_000, len(data)) - 1
        _send(handler, 206, data[start:end + 1], [("Content-Range", f"bytes {start}-{end}/{len(data)}"),
                                                  ("Content-Length", str(end + 1 - start))])

    scripted.answers = [capped]
    download_file(scripted.url, tmp_path / "data.npz", None, progress=False, retries=3)
    assert scripted.requests == [resume_at(size), resume_at(size + 30_000 - OVERLAP_BYTES)]
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD


def test_odd_headers_and_bodies_are_host_failures_not_tracebacks(scripted, tmp_path):
    """A doubled Content-Length was int()'s "invalid literal"; a body labelled gzip that is not, zlib.error;
    both without the manual-download instructions."""
    doubled = [("Content-Length", f"{len(PAYLOAD)}, {len(PAYLOAD)}")]
    scripted.answers = [lambda h, d, s: _send(h, 200, d, doubled)]
    download_file(scripted.url, tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=0)
    assert (tmp_path / "data.npz").read_bytes() == PAYLOAD
    scripted.answers = [lambda h, d, s: _send(h, 200, b"not gzip at all", [("Content-Encoding", "gzip")])]
    with pytest.raises(DownloadError, match=r"the server's gzip body could not be decoded \(Error -3"):
        download_file(scripted.url, tmp_path / "other.npz", None, progress=False, retries=0)
    assert not (tmp_path / "other.npz.part").exists()
    cut = gzip.compress(PAYLOAD)[:500]
    scripted.answers = [lambda h, d, s: _send(h, 200, cut, [("Content-Encoding", "gzip"),
                                                             ("Content-Length", str(len(cut)))])]
    with pytest.raises(DownloadError, match=r"connection closed after 500 bytes, before the end of the compressed"):
        download_file(scripted.url, tmp_path / "other.npz", None, progress=False, retries=0)  # was "500 of 500"


def test_content_length_counts_only_when_its_values_agree():
    from data_fetch.download import _content_length

    assert _content_length("300") == 300 and _content_length("300, 300") == 300
    assert _content_length("5, 6") is None and _content_length("abc") is None and _content_length(None) is None


def test_a_kept_mismatch_is_used_once_its_checksum_is_given_and_dropped_after_a_verified_download(scripted,
                                                                                                     tmp_path):
    """A .mismatch that the user checked and accepted with --hash was downloaded again; one left from an earlier
    attempt stayed beside the verified file for good (a second copy of a dataset archive)."""
    other = PAYLOAD[::-1]
    scripted.data = other  # the host re-packed the file
    with pytest.raises(HashMismatchError):
        download_file(scripted.url, tmp_path / "data.npz", sha256(PAYLOAD), progress=False, retries=0)
    assert (tmp_path / "data.npz.mismatch").read_bytes() == other
    download_file(scripted.url, tmp_path / "data.npz", sha256(other), progress=False, retries=0)
    assert (tmp_path / "data.npz").read_bytes() == other and len(scripted.requests) == 1  # no request
    (tmp_path / "data.npz").unlink()
    (tmp_path / "data.npz.mismatch").write_bytes(other)
    (tmp_path / "data.npz.part").write_bytes(other[:5000])  # a later attempt's, cut short: not kept beside the file
    download_file(scripted.url, tmp_path / "data.npz", sha256(other), progress=False, retries=0)
    assert (tmp_path / "data.npz").read_bytes() == other and not (tmp_path / "data.npz.part").exists()
    (tmp_path / "data.npz").unlink()
    (tmp_path / "data.npz.mismatch").write_bytes(b"an earlier attempt's bytes")
    download_file(scripted.url, tmp_path / "data.npz", sha256(other), progress=False, retries=0)
    assert (tmp_path / "data.npz").read_bytes() == other and not (tmp_path / "data.npz.mismatch").exists()


def test_a_second_fetch_into_the_same_folder_is_refused_while_the_first_runs(server, tmp_path):
    """Two at once wrote one .part file from both ends, and the second offered a --hash that accepted the
    spliced file; unpacking twice at once refused the other's half-written files as a user's."""
    server.files["/BUSBRA.zip"] = ARCHIVE
    url = server.url + "/BUSBRA.zip"
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / ".bus_bra.lock"
    lock.write_text(f"{os.getppid()} on {socket.gethostname()}\n")  # a live process: this one's parent
    with pytest.raises(data_fetch.FetchError, match=rf"another data_fetch \(process {os.getppid()} on .*\) is "
                                                    rf"fetching bus_bra into {tmp_path}; wait for it to finish"):
        fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
    assert server.requests == [] and lock.is_file()
    lock.write_text("")  # made, then killed before it wrote its id: held while it may be a live fetch's, then not
    with pytest.raises(data_fetch.FetchError, match=r"another data_fetch \(process unknown"):
        fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
    os.utime(lock, (lock.stat().st_atime, lock.stat().st_mtime - 61))
    fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
    assert not lock.exists()
    (tmp_path / ".bus_bra.complete").unlink()
    if os.name == "posix":  # a killed fetch's lock is taken over
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock.write_text(f"{gone.stdout.strip()} on {socket.gethostname()}\n")
        fetch("bus_bra", dest=tmp_path, url=url, known_hash=sha256(ARCHIVE), progress=False)
        assert (tmp_path / "BUSBRA" / "bus_data.csv").is_file() and not lock.exists()


def test_a_folder_removed_by_another_fetch_before_the_lock_is_made_again(tmp_path, folder_removed_before_its_lock):
    """Fetch B made the folder (it existed); fetch A, failing, removed it empty; B's lock then could not be created:
    a bare FileNotFoundError naming the lock."""
    copy = tmp_path / "breastmnist.npz"
    copy.write_bytes(b"a copy")
    folder = fetch("breastmnist", dest=tmp_path / "data", url=copy.as_uri(),
                   known_hash=f"sha256:{hashlib.sha256(b'a copy').hexdigest()}", progress=False)
    assert folder_removed_before_its_lock == [str(folder)] and (folder / "breastmnist.npz").read_bytes() == b"a copy"


def test_a_lock_file_is_an_ordinary_file_not_an_executable_one(tmp_path):
    from data_fetch.locking import take_lock

    old = os.umask(0o022)
    try:
        assert take_lock(tmp_path / ".busi.lock") is None
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / ".busi.lock").stat().st_mode) == 0o644  # was 0o755 (os.open's default 0o777)


def test_a_lock_whose_id_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """A full disk while the lock's process id was written left an empty lock: the next run (of fit, the course,
    data_fetch) was turned away for a minute as held by "process unknown"."""
    from data_fetch import locking
    from data_fetch.locking import take_lock

    real = os.fdopen

    def full(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        f.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f

    monkeypatch.setattr(locking.os, "fdopen", full)
    with pytest.raises(OSError) as error:
        take_lock(tmp_path / ".busi.lock")
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and not (tmp_path / ".busi.lock").exists()
    assert take_lock(tmp_path / ".busi.lock") is None  # the next run takes it


def test_a_lock_released_while_it_was_read_is_taken_and_an_old_one_of_a_live_process_kept(tmp_path, monkeypatch):
    from pathlib import Path

    from data_fetch.locking import take_lock

    lock = tmp_path / ".bus_bra.lock"
    lock.write_text("1 on another-machine\n")
    real = Path.read_text

    def released_meanwhile(self, *args, **kwargs):  # its holder finished between our attempt and our look
        if self == lock and lock.exists():
            lock.unlink()
            raise FileNotFoundError(str(lock))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", released_meanwhile)
    assert take_lock(lock) is None
    monkeypatch.undo()
    assert lock.read_text().startswith(f"{os.getpid()} on ")
    lock.write_text(f"{os.getppid()} on {socket.gethostname()}\n")  # a live process's, however old
    os.utime(lock, (lock.stat().st_atime, lock.stat().st_mtime - 3600))
    assert take_lock(lock).startswith(f"process {os.getppid()} on ")


# ---------------------------------------------------------------- found unpinned by a mutation sweep


def test_a_repair_refused_for_lack_of_space_keeps_the_last_fetchs_marker(server, tmp_path, monkeypatch):
    """The space is checked before the folder changes: refused there, the old marker went all the same (and an
    .unpacking marker stayed), so a folder nothing was written to read as a fetch cut short."""
    import collections

    from data_fetch import archive as archive_module

    server.files["/BUSBRA.zip"] = ARCHIVE
    kwargs = {"dest": tmp_path, "url": server.url + "/BUSBRA.zip", "known_hash": sha256(ARCHIVE), "progress": False}
    fetch("bus_bra", **kwargs)
    marker = (tmp_path / ".bus_bra.complete").read_text()
    (tmp_path / "BUSBRA" / "bus_data.csv").unlink()  # a repair: unpacked again
    full = collections.namedtuple("usage", "total used free")(10**9, 10**9, 0)
    monkeypatch.setattr(archive_module.shutil, "disk_usage", lambda path: full)
    with pytest.raises(data_fetch.FetchError, match="has 0.0 MB free; nothing was extracted"):
        fetch("bus_bra", **kwargs)
    assert (tmp_path / ".bus_bra.complete").is_file() and (tmp_path / ".bus_bra.complete").read_text() == marker
    assert not (tmp_path / ".bus_bra.unpacking").exists()


def test_the_listing_names_each_datasets_own_folder(monkeypatch, capsys):
    """`list` is where a user finds the folder to pass to load_dataset: the data root alone would send every
    dataset's reader to the same, wrong, place."""
    from pathlib import Path

    root = Path("/data/root")
    monkeypatch.setenv("MTLEARN_DATA", str(root))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, source in data_fetch.SOURCES.items():
        assert f"    folder:   {root / source.folder}\n" in out, name
    assert f"data root: {root} " in out


def test_resolutions_sharing_a_folder_are_fetched_at_the_same_time(server, tmp_path, monkeypatch):
    """busi_128 and busi_256 share busi_npz but no file (own .part, marker and lock): one lock per folder refused
    the second while the first downloaded, though neither touches the other's files."""
    server.files["/busi_128.npz"], server.files["/busi_256.npz"] = PAYLOAD, PAYLOAD[::-1]
    download_file, during = data_fetch.download_file, []

    def with_busi_256_meanwhile(url, target, *args, **kwargs):
        if target.name == "busi_128.npz":
            locks = list(tmp_path.glob("*.lock"))  # busi_128's: held as if by another process, alive
            for lock in locks:
                lock.write_text(f"{os.getppid()} on {socket.gethostname()}\n")
            try:
                during.append(fetch("busi_256", dest=tmp_path, url=server.url + "/busi_256.npz",
                                    known_hash=sha256(PAYLOAD[::-1]), progress=False))
            except data_fetch.FetchError as refused:
                during.append(str(refused))
            assert all(lock.is_file() for lock in locks) and locks  # still busi_128's
        return download_file(url, target, *args, **kwargs)

    monkeypatch.setattr(data_fetch, "download_file", with_busi_256_meanwhile)
    fetch("busi_128", dest=tmp_path, url=server.url + "/busi_128.npz", known_hash=sha256(PAYLOAD), progress=False)
    assert during == [tmp_path] and (tmp_path / "busi_256.npz").read_bytes() == PAYLOAD[::-1]
    assert (tmp_path / "busi_128.npz").read_bytes() == PAYLOAD and not list(tmp_path.glob("*.lock"))
    assert (tmp_path / ".busi_128.complete").is_file() and (tmp_path / ".busi_256.complete").is_file()
