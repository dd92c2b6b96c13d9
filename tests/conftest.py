"""Shared test set-up.

The tests work on tiny tensors, where torch's intra-op threads cost more than they save: on a
busy 2-core CI machine two threads made some tests 25-35x slower than one. One thread keeps the
suite fast and its timing predictable; it does not change any result.
"""
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def caches_in_the_sessions_folder(tmp_path_factory):
    """What the tests' kernels and compilers would keep for the user, kept in pytest's own folder instead: the
    IPython profile papermill's kernels make (~/.ipython), torch.compile's cache (/tmp/torchinductor_<user>) and
    torchrun's per-run folders (/tmp/torchelastic_*, never removed): nothing outside the tests' folders."""
    caches = tmp_path_factory.mktemp("caches")
    patch = pytest.MonkeyPatch()
    patch.setenv("IPYTHONDIR", str(caches / "ipython"))
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(caches / "inductor"))
    patch.setenv("TMPDIR", str(caches))  # for the processes the tests start (kernels, torchrun)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def close_figures():
    """pyplot keeps every figure until it is closed (a test that draws 20 warned): close them after each test."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")  # only where a test drew: importing it costs a second
    if pyplot is not None:
        pyplot.close("all")


@pytest.fixture
def disk_full_midway(monkeypatch):
    """Call it to make every file written through mtlearn.utils.atomic_file (write_text, write_json,
    save_checkpoint) receive half of what is written to it, then raise OSError("disk full")."""
    import builtins

    from mtlearn import utils

    class HalfWritten:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise OSError("disk full")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    def half_written(*args, **kwargs):
        return HalfWritten(builtins.open(*args, **kwargs))

    return lambda: monkeypatch.setattr(utils, "open", half_written, raising=False)


@pytest.fixture
def full_disk(monkeypatch, request):
    """Call it to put every file written through mtlearn.utils.atomic_file on a full disk: buffered as a real file,
    its first `room` bytes reach the disk (a write is cut short there, as by a real one) and the next is refused
    with OSError ENOSPC (or the errno given as `error`: EIO for a failing disk), when the buffer (of `buffer`
    bytes) spills or is flushed. (disk_full_midway's error carries no errno.)"""
    import errno
    import io
    import os
    import tempfile

    from mtlearn import utils

    synced = tempfile.TemporaryFile()
    request.addfinalizer(synced.close)

    def fill(room=0, buffer=io.DEFAULT_BUFFER_SIZE, error=errno.ENOSPC):
        class Disk(io.RawIOBase):
            written = 0

            def writable(self):
                return True

            def fileno(self):  # for atomic_file's fsync: a real file's descriptor
                return synced.fileno()

            def write(self, data):  # as a disk does: what still fits, then ENOSPC
                taken = min(len(data), room - self.written)
                if taken <= 0:
                    raise OSError(error, os.strerror(error))
                self.written += taken
                return taken

        def opened(name, mode, **kwargs):
            file = io.BufferedWriter(Disk(), buffer_size=buffer)
            return file if "b" in mode else io.TextIOWrapper(file, encoding=kwargs.get("encoding"))

        monkeypatch.setattr(utils, "open", opened, raising=False)

    return fill


@pytest.fixture
def cp1252_stdout(monkeypatch):
    """Call it (in the test: pytest sets its own sys.stdout again once setup is over) to make sys.stdout what a
    Windows console redirected to a file or pipe is: cp1252, strict (it cannot spell "Ł", and a path holding
    one raised UnicodeEncodeError). It returns a function giving what was printed."""
    import io
    import sys

    def install():
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
        monkeypatch.setattr(sys, "stdout", stream)

        def printed():
            stream.flush()
            return raw.getvalue().decode("cp1252")

        return printed

    return install


@pytest.fixture
def unwritable(monkeypatch):
    """Call it with folders to make os.access say no one may write to them, as for a folder of mode 555 (which
    the tests cannot make by chmod when they run as root, whom the file system lets write anyway); with
    searchable=False, that no one may enter them either (mode 666: os.access denies X_OK alone too)."""
    import os

    denied = {}  # folder -> the access bits denied
    access = os.access

    def refusing(path, mode, *args, **kwargs):
        if mode & denied.get(os.path.realpath(path), 0):
            return False
        return access(path, mode, *args, **kwargs)

    def deny(*folders, searchable=True):
        denied.update({os.path.realpath(folder): os.X_OK if not searchable else os.W_OK for folder in folders})

    monkeypatch.setattr(os, "access", refusing)
    return deny


@pytest.fixture
def held_by_another_run():
    """Call it with a folder to make it held by another live run, as out_dir_lock leaves it: its .lock names a
    process of this machine that is alive (this one's parent); returns that process's id. lock=: that lock file
    instead (the course runner's and a grid's are beside their folder)."""
    import os
    import socket

    def hold(folder=None, *, lock=None):
        lock = lock if lock is not None else folder / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(f"{os.getppid()} on {socket.gethostname()}\n")
        return os.getppid()

    return hold


@pytest.fixture
def folder_removed_before_its_lock(monkeypatch):
    """Make the first lock file created (data_fetch.locking's) find its folder gone, removed empty in between by
    another run that made it and failed; returns the list of folders so removed."""
    import os

    from data_fetch import locking

    create, removed = os.open, []

    def after_a_failed_run(path, *args, **kwargs):
        if str(path).endswith(".lock") and not removed:
            removed.append(os.path.dirname(path))
            os.rmdir(os.path.dirname(path))  # between this run's mkdir and its lock
        return create(path, *args, **kwargs)

    monkeypatch.setattr(locking.os, "open", after_a_failed_run)
    return removed


@pytest.fixture
def sigterm_handler_set_in_c(monkeypatch):
    """As if C code had set SIGTERM's handler: the first signal.signal answers None (Python cannot give it back).
    Yields the handlers installed since, in order; SIGTERM's own is put back afterwards."""
    import signal

    real, installed = signal.signal, []

    def as_if_set_in_c(signum, handler):
        installed.append(handler)
        previous = real(signum, handler)
        return None if len(installed) == 1 else previous

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(signal, "signal", as_if_set_in_c)
    yield installed
    real(signal.SIGTERM, before)
