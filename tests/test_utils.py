import errno
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mtlearn.utils import (
    FolderNotWritableError,
    check_folder,
    count_flops,
    count_parameters,
    environment_report,
    format_count,
    is_distributed,
    is_main_process,
    pick_device,
    seed_everything,
    world_and_rank,
    write_text,
)


def test_seed_everything_repeats_torch_and_numpy():
    seed_everything(3)
    a = (torch.rand(4), np.random.rand(4))
    seed_everything(3)
    b = (torch.rand(4), np.random.rand(4))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("cuda, deterministic, benchmark, expected", [
    (True, True, False, (True, False)),  # asked for bit-exact GPU runs: set to False by every seeding (fit, start)
    (True, False, False, (False, True)),  # torch's defaults: the autotuner, for speed, on CUDA
    (False, False, False, (False, False)),  # nothing to autotune without CUDA
    (False, False, True, (False, True)),  # a user's own autotuner stays on
    (True, True, True, (True, False)),  # on from an earlier seeding (a notebook's start), then deterministic asked for
])
def test_seed_everything_keeps_the_cudnn_kernels_asked_for(monkeypatch, cuda, deterministic, benchmark, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", benchmark)
    seed_everything(0)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == expected
    seed_everything(0)  # a second seeding (the next fit) changes nothing
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == expected


@pytest.mark.parametrize("bad", [-1, 1.5, "7", None, True, 2**32, 2**64])  # 2**64: torch's bare "Overflow"
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(bad)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_auto_prefers_cuda_then_mps_then_the_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad, message", [("gpu", "unknown device"), (3, "device must be a string"),
                                          ("cuda:x", "unknown device 'cuda:x'"), ("auto:0", "unknown device 'auto:0'"),
                                          ("cpu:7", "'cpu:7': there is one CPU device; use 'cpu'"),
                                          ("cpu:1", "'cpu:1': there is one CPU device; use 'cpu'"),
                                          ("cuda:\u00b2", "unknown device")])  # '²'.isdigit(), but int('²') fails
def test_pick_device_rejects_bad_names(bad, message):
    with pytest.raises(ValueError, match=message):
        pick_device(bad)


def test_pick_device_names_a_gpu_number_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as on Colab
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    assert pick_device("cpu:0") == torch.device("cpu:0")  # a tensor's .device, passed on as it is
    with pytest.raises(ValueError,
                       match=r"device 'cuda:7': there is no GPU 7, this machine has 1 \(cuda:0 to cuda:0\)"):
        pick_device("cuda:7")
    with pytest.raises(ValueError, match=r"there is no GPU 1"):  # one past the last: numbered from 0
        pick_device("cuda:1")


def test_pick_device_mps_without_apples_backend_says_so(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'mps' was requested but Apple's MPS backend is not available"):
        pick_device("mps")


def test_pick_device_cuda_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:5' was requested but no CUDA GPU"):  # as asked, not 'cuda'
        pick_device("cuda:5")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pick_device("cuda")


def test_count_parameters_trainable_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10 parameters
    model[0].requires_grad_(False)
    assert count_parameters(model) == 26
    assert count_parameters(model, trainable_only=True) == 10


def test_batches_from_stops_the_workers_when_its_block_fails_but_not_persistent_ones():
    import multiprocessing

    from torch.utils.data import DataLoader

    from mtlearn.utils import batches_from

    def children():
        return {process.pid for process in multiprocessing.active_children()}

    data = list(range(32))
    for persistent in (False, True):
        loader = DataLoader(data, batch_size=4, num_workers=2, persistent_workers=persistent)
        before = children()
        with pytest.raises(KeyboardInterrupt) as kept:
            with batches_from(loader) as batches:
                assert next(batches).tolist() == [0, 1, 2, 3]
                raise KeyboardInterrupt
        assert kept.tb is not None  # the traceback, and the frames holding the iterator, are kept
        left = children() - before
        assert len(left) == (2 if persistent else 0)  # persistent workers wait for the loader's next pass
        if persistent:
            assert [b.tolist() for b in loader][0] == [0, 1, 2, 3]  # and serve it
            del kept, batches, loader  # their owner gone, they stop


def test_counting_a_preset_name_instead_of_a_model_is_named():
    """count_parameters("tiny") said "'str' object has no attribute 'parameters'"."""
    with pytest.raises(TypeError, match=r"count_parameters takes a model \(an nn\.Module\), got a str; build it "
                                        r"first, e\.g\. count_parameters\(mtlearn\.build_model\('tiny'\)\)"):
        count_parameters("tiny")
    with pytest.raises(TypeError, match=r"count_flops takes a model .*got an OrderedDict"):
        count_flops(nn.Linear(2, 2).state_dict(), torch.zeros(1, 2))


def test_count_flops_linear_layer():
    model = nn.Linear(8, 5, bias=False)
    assert count_flops(model, torch.zeros(3, 8)) == 2 * 3 * 8 * 5
    assert model.training  # the count leaves the mode as it found it
    model.eval()
    count_flops(model, torch.zeros(3, 8))
    assert not model.training  # an evaluation model stays in eval mode


def test_count_flops_counts_attention_on_the_cpu():
    """QK^T and AV: 2 x (2 N^2 d) FLOPs, which torch's counter misses in the fused CPU kernel."""

    class Attention(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    n, d = 16, 8
    assert count_flops(Attention(), torch.randn(1, 2, n, d)) == 2 * 2 * (2 * n * n * d)  # 2 heads


def test_count_flops_counts_torchs_own_attention_layers():
    """In eval mode without gradients nn.MultiheadAttention takes a fused fast path the counter has no
    formula for: it counted 0. Here: q, k, v and out projections 4 x (2 N E^2), QK^T and AV 2 x (2 N^2 E)."""
    n, e = 12, 16
    mha = nn.MultiheadAttention(e, num_heads=2, batch_first=True)
    x = torch.randn(1, n, e)
    assert count_flops(mha, x, x, x) == 4 * (2 * n * e * e) + 2 * (2 * n * n * e)
    layer = nn.TransformerEncoderLayer(e, nhead=2, dim_feedforward=32, batch_first=True)
    feed_forward = 2 * (2 * n * e * 32)
    assert count_flops(layer, x) == 4 * (2 * n * e * e) + 2 * (2 * n * n * e) + feed_forward
    assert torch.backends.mha.get_fastpath_enabled()  # given back as it was


def test_a_file_whose_name_is_near_the_limit_is_written_atomically(tmp_path):
    """The temporary name adds dots, a machine tag, the pid, 16 hex digits and ".tmp": a 244-byte name failed
    ("File name too long")."""
    from mtlearn.utils import write_text

    path = tmp_path / ("é" * 100 + "x" * 40 + ".json")  # 244 bytes in UTF-8
    write_text("{}", path)
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_atomic_write_reaches_the_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    """fsync before os.replace: else a power cut right after the rename can leave an empty file under the
    final name (ext4's delayed allocation), the loss the temporary file exists to prevent."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_text("{}", tmp_path / "metrics.json")
    assert calls == ["fsync", "replace"] and (tmp_path / "metrics.json").read_text() == "{}"


def test_warnings_above_clears_the_bar_before_a_warning_and_draws_it_again_after(monkeypatch):
    import io
    import warnings

    from tqdm import tqdm

    from mtlearn.utils import warnings_above

    stream = io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):  # the bar's own stream, as a terminal
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with warnings_above(tqdm(total=4, desc="epoch 1/2", disable=True)):
            assert warnings.showwarning is show  # a disabled bar changes nothing
        bar = tqdm(total=4, desc="epoch 1/2", file=stream, mininterval=0)
        with warnings_above(bar):
            warnings.warn("the loss is high", stacklevel=1)
        assert warnings.showwarning is show  # given back
        text = stream.getvalue()  # before close() draws the bar once more
        bar.close()
    before, after = text.split("UserWarning: the loss is high")
    assert "epoch 1/2" in before and "epoch" not in re.split("[\r\n]", before)[-1]  # cleared first
    assert "epoch 1/2" in after  # drawn again
    with warnings.catch_warnings():  # a handler installed while the bar is open is not taken away at its end
        with warnings_above(tqdm(total=1, file=io.StringIO())):
            warnings.showwarning = print
        assert warnings.showwarning is print


def test_a_folder_no_one_may_write_to_is_refused_naming_it_and_the_fix(tmp_path, unwritable):
    """Found when the first file was written, after the work: a notebook's finish(), fit's first epoch."""
    folder = tmp_path / "shared"
    folder.mkdir()
    unwritable(folder)
    for path, named in [(folder, f"--out {folder} is not writable: "),
                        (folder / "a" / "b", f"--out {folder / 'a' / 'b'} is not writable ({folder}, the folder it "
                                             "would be made in): ")]:
        with pytest.raises(FolderNotWritableError, match=re.escape(
                f"{named}no permission to create files there, or a read-only disk. Choose another --out, one you "
                "can write to (it receives results)")) as caught:
            check_folder(path, "--out", "results")
        assert isinstance(caught.value, PermissionError) and isinstance(caught.value, ValueError)
    check_folder(folder, "data_root", "datasets", write=False)  # read only: fetched datasets in a shared folder
    check_folder(tmp_path / "other", "--out", "results")  # its parent is writable


def test_a_folder_below_one_that_may_not_be_entered_is_not_writable_either(tmp_path, monkeypatch, unwritable):
    """Below a folder of mode 700 of another user, Path.exists raises PermissionError (Python 3.11): a traceback
    on the command line where the one-line refusal belongs. A folder that may be written but not entered
    (mode 666) takes no new file either."""
    import pathlib

    locked = tmp_path / "locked"
    locked.mkdir()
    exists = pathlib.Path.exists

    def not_searchable(self, *args, **kwargs):
        if locked in self.parents:  # whatever lies below it, however deep
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", not_searchable)
    unwritable(locked, searchable=False)
    for below in (locked / "run", locked / "run" / "a" / "b"):
        with pytest.raises(FolderNotWritableError, match=re.escape(f"--out {below} is not writable ({locked}, the "
                                                                   "folder it would be made in)")):
            check_folder(below, "--out", "results")
    check_folder(locked / "run" / "a", "data_root", "datasets", write=False)  # only read: the loader says more


def test_an_atomic_write_refused_by_its_folder_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    from mtlearn import utils

    def refused(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(utils, "open", refused, raising=False)
    with pytest.raises(PermissionError) as caught:
        write_text("x", tmp_path / "last.pt")
    assert str(caught.value) == (f"cannot write {tmp_path / 'last.pt'}: no permission to create files in {tmp_path}; "
                                 "give a path in a folder you can write to")  # no "[Errno 13]" first, no .tmp name
    assert caught.value.errno == 13


@pytest.mark.parametrize("room, buffer", [(0, 8192), (100, 16)])  # refused at the flush; inside torch.save
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, full_disk, room, buffer):
    """A full disk surfaced as a bare "[Errno 28] No space left on device", or, refused while torch.save was
    writing, as torch's RuntimeError "unexpected pos 64 vs 0": neither named the file nor the way out."""
    from mtlearn.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    write_text("earlier", tmp_path / "metrics.json")
    full_disk(room, buffer)
    for write, path in ((lambda p: save_checkpoint({"epoch": 2, "w": torch.zeros(100)}, p), tmp_path / "last.pt"),
                        (lambda p: write_text("later" * 2000, p), tmp_path / "metrics.json")):
        with pytest.raises(OSError) as caught:
            write(path)
        assert str(caught.value) == (f"cannot write {path}: the disk is full ({os.strerror(errno.ENOSPC)}); free "
                                     "some space, or write to a folder on another disk (the previous file, if any, is "
                                     "kept)")
        assert caught.value.errno == errno.ENOSPC and caught.value.__suppress_context__
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert (tmp_path / "metrics.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.json"]  # no temporary file left


@pytest.mark.parametrize("room, buffer", [(0, 8192), (100, 16)])
def test_a_failing_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, full_disk, room, buffer):
    """An I/O error while writing (a failing disk or USB stick, a network share gone) was a bare "[Errno 5]",
    or torch's "unexpected pos", naming no file."""
    from mtlearn.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    full_disk(room, buffer, error=errno.EIO)
    with pytest.raises(OSError) as caught:
        save_checkpoint({"epoch": 2, "w": torch.zeros(100)}, tmp_path / "last.pt")
    assert str(caught.value) == (f"cannot write {tmp_path / 'last.pt'}: {os.strerror(errno.EIO)}; give a path in a "
                                 "folder you can write to")
    assert caught.value.errno == errno.EIO
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_sigterm_is_an_interrupt_only_for_the_duration_and_only_from_the_main_thread():
    import signal
    import threading

    from mtlearn.utils import Terminated, sigterm_as_interrupt, stop_status

    def kernels_own(signum, frame):  # a handler of the caller's (a kernel's), not the default
        pass

    before = signal.signal(signal.SIGTERM, kernels_own)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is not kernels_own
            with pytest.raises(Terminated) as stopped:
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is kernels_own  # main() called in a notebook gives the kernel its own
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop_status(stopped.value) == ("terminated (SIGTERM)", 143)
    assert stop_status(KeyboardInterrupt()) == ("interrupted", 130)
    seen = []

    def in_a_thread():  # signal.signal would raise "signal only works in main thread of the main interpreter"
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_sigterm_handler_set_outside_python_gives_way_to_the_default_afterwards(sigterm_handler_set_in_c):
    """signal.signal answers None for a handler that C code set; handing None back raised TypeError on the way out."""
    import signal

    from mtlearn.utils import sigterm_as_interrupt

    with sigterm_as_interrupt():
        pass
    assert sigterm_handler_set_in_c == [sigterm_handler_set_in_c[0], signal.SIG_DFL]  # not None: TypeError


def test_an_interrupt_inside_torch_save_stays_an_interrupt_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """torch.save turns Ctrl-C (or the train CLI's SIGTERM) met while writing into RuntimeError "unexpected pos":
    the CLI printed that traceback with status 1, not its "interrupted ... --resume" and 130 or 143."""
    import io

    from mtlearn import utils
    from mtlearn.checkpoint import load_checkpoint, save_checkpoint

    class Stopped(KeyboardInterrupt):  # as train.Terminated: the kind must come through, not only the base
        pass

    class Interrupted(io.RawIOBase):  # takes 200 bytes, then the interrupt: inside torch's zip writer
        written = 0

        def writable(self):
            return True

        def write(self, data):
            self.written += len(data)
            if self.written > 200:
                raise Stopped
            return len(data)

    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    monkeypatch.setattr(utils, "open", lambda name, mode, **kwargs: io.BufferedWriter(Interrupted(), 16),
                        raising=False)
    with pytest.raises(Stopped):
        save_checkpoint({"epoch": 2, "w": torch.zeros(100)}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_an_error_of_the_callers_own_without_an_errno_is_left_as_it_is(tmp_path):
    from mtlearn.utils import atomic_file

    with pytest.raises(OSError, match="^mine$"):  # not "cannot write notes.txt: ..."
        with atomic_file(tmp_path / "notes.txt") as f:
            f.write("x")
            raise OSError("mine")
    assert list(tmp_path.iterdir()) == []


def test_printable_stdout_leaves_a_stream_that_cannot_be_reconfigured_alone(monkeypatch):
    """A notebook's stdout (ipykernel's OutStream) has no reconfigure(): the CLIs' main() is called from notebooks."""
    import io
    import sys

    from mtlearn.utils import printable_stdout

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    printable_stdout()
    print("Łukasz")
    assert sys.stdout.getvalue() == "Łukasz\n"


def test_a_full_disk_met_by_the_callers_own_code_about_another_file_is_not_renamed(tmp_path):
    from mtlearn.utils import atomic_file

    other = str(tmp_path / "elsewhere" / "big.bin")
    with pytest.raises(OSError) as caught:
        with atomic_file(tmp_path / "notes.txt") as f:
            f.write("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), other)
    assert caught.value.filename == other and "notes.txt" not in str(caught.value)
    assert not (tmp_path / "notes.txt").exists() and list(tmp_path.iterdir()) == []


def test_a_file_another_program_holds_open_is_named_with_the_way_out(tmp_path, monkeypatch):
    """On Windows os.replace onto a file open elsewhere (results.csv in Excel) raises PermissionError: it was bare."""
    from mtlearn import utils

    def locked(src, dst):
        raise PermissionError(13, "Permission denied")

    write_text("earlier", tmp_path / "results.csv")
    monkeypatch.setattr(utils.os, "replace", locked)
    with pytest.raises(PermissionError) as caught:
        write_text("later", tmp_path / "results.csv")
    monkeypatch.undo()
    assert str(caught.value) == (f"cannot replace {tmp_path / 'results.csv'} (Permission denied); close any program "
                                 "that has it open, or give a path in a folder you can write to")
    assert (tmp_path / "results.csv").read_text() == "earlier" and len(list(tmp_path.iterdir())) == 1


def test_an_atomic_write_removes_what_killed_writes_of_the_same_file_left(tmp_path):
    """kill -9 (or a power cut) while writing runs no cleanup: each left a hidden temporary file for good."""
    import subprocess
    import time

    from mtlearn.utils import _host_tag

    path, here = tmp_path / "last.pt", _host_tag()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(child.stdout)  # a process that has ended
    killed = tmp_path / f".last.pt.{here}-{gone}-0123456789abcdef.tmp"
    alive = tmp_path / f".last.pt.{here}-{os.getppid()}-0123456789abcdef.tmp"  # a live process, writing now
    forgotten = tmp_path / f".last.pt.{here}-{os.getppid()}-fedcba9876543210.tmp"  # untouched for two hours
    elsewhere = tmp_path / f".last.pt.0badc0de-{gone}-0123456789abcdef.tmp"  # another machine's: its pids unknown
    other_file = tmp_path / f".best.pt.{here}-{gone}-0123456789abcdef.tmp"  # another file's: its own writes clean it
    look_alike = tmp_path / f".last.pt.{here}-{gone}-notours.tmp"
    backup = tmp_path / f".last.pt.{here}-{gone}-0123456789abcdef.tmp~"  # an editor's copy of one: not ours
    for leftover in (killed, alive, forgotten, elsewhere, other_file, look_alike, backup):
        leftover.write_bytes(b"half a checkpoint")
    hours_ago = time.time() - 2 * 3600
    os.utime(forgotten, (hours_ago, hours_ago))
    write_text("{}", path)
    kept = (path, alive, elsewhere, other_file, look_alike, backup)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    os.utime(elsewhere, (hours_ago, hours_ago))  # nobody has written to it for two hours: stale there too
    write_text("{}", path)
    assert not elsewhere.exists()


def test_another_users_process_counts_as_alive(monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: it runs, and its temporary file stays."""
    from mtlearn.utils import _process_alive

    def refuse(pid, signal):
        raise PermissionError("not yours")

    monkeypatch.setattr(os, "kill", refuse)
    assert _process_alive(12345)
    monkeypatch.undo()
    assert not _process_alive(2**40)  # past any process id (OverflowError)


def test_environment_report_names_device_and_versions():
    report = environment_report("cpu")
    assert report["device"] == "cpu" and report["torch"] == torch.__version__


def test_format_count():
    assert format_count(33_712_000) == "33.7M" and format_count(950) == "950"
    assert format_count(1.5e13) == "15.0T" and format_count(float("nan")) == "nan"  # a training's FLOPs; unmeasured


@pytest.mark.parametrize("n, text", [(999_949, "999.9k"), (999_950, "1.0M"), (999_999_999, "1.0G"), (999, "999")])
def test_format_count_never_writes_a_thousand_of_a_unit(n, text):
    assert format_count(n) == text


def _partly_frozen() -> nn.Module:
    """A model in training mode whose BatchNorm the user froze (eval mode: running statistics fixed)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].eval()
    return model


def test_eval_mode_gives_every_submodule_its_own_mode_back():
    from mtlearn.utils import eval_mode

    model = _partly_frozen()
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [True, True, False, True, True]
    with pytest.raises(RuntimeError), eval_mode(model):  # restored on an error too
        raise RuntimeError
    assert model.training and not model[1].training


class _Tracked(nn.Linear):
    """Records every device it is moved to (on a CPU-only machine the moves are what a GPU run would see)."""

    def __init__(self):
        super().__init__(4, 2)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(torch.device(args[0] if args else kwargs["device"]))
        return super().to(*args, **kwargs)


def test_eval_mode_with_a_device_moves_the_model_there_and_back():
    from mtlearn.utils import eval_mode

    model = _Tracked()
    with eval_mode(model):
        pass
    assert model.moves == []  # no device: the model stays where it is
    with eval_mode(model, torch.device("cpu")):
        assert model.moves == [torch.device("cpu")]
    assert model.moves == [torch.device("cpu")] * 2  # back to where its parameters were
    with pytest.raises(RuntimeError), eval_mode(model, torch.device("cpu")):  # moved back on an error too
        raise RuntimeError
    assert len(model.moves) == 4 and model.training


def test_eval_mode_moves_a_model_without_parameters_and_leaves_it():
    from mtlearn.utils import eval_mode

    model = nn.ReLU()  # nothing says where it was, and nothing needs moving back
    with eval_mode(model, torch.device("cpu")):
        assert not model.training
    assert model.training


def test_count_flops_leaves_a_frozen_batchnorm_frozen():
    model = _partly_frozen()
    count_flops(model, torch.zeros(3, 4))
    assert model.training and not model[1].training
    training_bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    count_flops(training_bn, torch.randn(3, 4))
    assert training_bn[1].num_batches_tracked == 0  # counted in eval mode: the running statistics untouched


@pytest.mark.parametrize("n, text", [(1_000, "1.0k"), (999, "999"), (1_000_000, "1.0M"), (2_500_000_000, "2.5G"),
                                     (1e9, "1.0G"), (-4_330_000, "-4.3M"), (0, "0")])
def test_format_count_units_start_at_their_scale(n, text):
    assert format_count(n) == text


def test_check_options_names_the_unknown_and_the_valid():
    import dataclasses

    from mtlearn.utils import check_options

    @dataclasses.dataclass
    class Config:
        lr: float = 1e-3
        epochs: int = 1

    check_options(Config, {"lr": 0.1})  # known fields pass
    with pytest.raises(ValueError,
                       match=r"unknown option\(s\) \['learning_rate'\]; valid options are \['epochs', 'lr'\]"):
        check_options(Config, {"learning_rate": 0.1, "lr": 0.1})


def test_check_int_and_check_size_name_the_int_fix():
    from mtlearn.utils import check_int, check_size

    assert check_int("n", np.int64(3), 2) == 3 and check_size(np.int64(64)) == (64, 64)
    assert check_int("n", 2, 2) == 2 and check_size(32, minimum=32) == (32, 32)  # the minimum itself is allowed
    assert check_size([48, 64], minimum=32) == (48, 64)
    with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\)"):
        check_size((64, 64, 64))  # three sides: not cut to the first two
    for bad in (2.0, True, "3", 1):
        with pytest.raises(ValueError, match=r"n must be an integer >= 2, got"):
            check_int("n", bad, 2)
    for computed in (3.5, np.float32(3.0)):  # a NumPy float (a mean, a division of arrays) is computed too
        with pytest.raises(ValueError, match=r"; pass an int, e\.g\. int\(\.\.\.\)"):
            check_int("n", computed, 2)
        with pytest.raises(ValueError, match=r"; pass ints: int\(\.\.\.\) or //"):
            check_size((64, computed * 16))
    for bad in (128.0, (64, 64.0), None, "64", (64, 64, 3), (16, 64)):
        with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\) of ints >= 32"):
            check_size(bad, minimum=32)
    with pytest.raises(ValueError, match=r"got 128\.0; pass ints: int\(\.\.\.\) or //"):
        check_size(256 / 2)


@pytest.mark.parametrize("value, number, integer", [
    (3, True, True), (np.int64(3), True, True), (2.5, True, False), (np.float32(2.5), True, False),
    (True, False, False), (False, False, False), ("1e-3", False, False), (None, False, False),
])
def test_is_number_and_is_int_refuse_bools_and_strings(value, number, integer):
    from mtlearn.utils import is_int, is_number

    assert is_number(value) is number and is_int(value) is integer


def test_check_item_index_takes_item_numbers_only():
    from mtlearn.utils import check_item_index

    assert check_item_index(np.int64(2), 3) == 2 and type(check_item_index(np.int64(2), 3)) is int
    for index in (torch.tensor(2), np.array(2)):  # as a list takes them
        assert check_item_index(index, 3) == 2 and type(check_item_index(index, 3)) is int
    for index in (torch.tensor(2.0), torch.tensor(True), torch.tensor([2])):
        with pytest.raises(TypeError, match=rf"index must be an integer, got {re.escape(repr(index))}"):
            check_item_index(index, 3)
    with pytest.raises(IndexError, match=r"index 3 out of range for a dataset of 3 items \(0 to 2\)"):
        check_item_index(3, 3)
    with pytest.raises(IndexError, match=r"index 0 out of range for a dataset of 0 items \(it is empty\)"):
        check_item_index(0, 0)
    with pytest.raises(TypeError, match="index must be an integer, got 2.0"):
        check_item_index(2.0, 3)
    with pytest.raises(IndexError, match=r"index -1 out of range for a dataset of 3 items \(0 to 2\); count from "
                                         r"the start: len\(dataset\) - 1 is the last item"):  # not the last item
        check_item_index(-1, 3)
    with pytest.raises(IndexError) as caught:
        check_item_index(3, 3)
    assert "count from the start" not in str(caught.value)  # only a negative index gets that advice


@pytest.mark.parametrize("keys", [None, "shape", ("shape",), ("shape", "shape"), ("shape", 1),
                                  ("shape", "background", "colour"),  # a third would be ignored
                                  {"shape", "background"}, {"shape": 0, "background": 1}])
def test_check_label_pair_takes_two_different_names_in_order(keys):
    from mtlearn.utils import check_label_pair

    check_label_pair(("shape", "background"))
    check_label_pair(["class", "artifact"])
    with pytest.raises(ValueError, match=r"task_keys must be two different label names, task A's first"):
        check_label_pair(keys)


def test_process_group_helpers_outside_in_a_group_of_one_and_on_a_second_rank(tmp_path, monkeypatch):
    assert (world_and_rank(), is_distributed(), is_main_process()) == ((1, 0), False, True)  # no torchrun
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert (world_and_rank(), is_distributed(), is_main_process()) == ((1, 0), False, True)  # a group of one
        monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 3)
        monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: 2)
        assert (world_and_rank(), is_distributed(), is_main_process()) == ((3, 2), True, False)
        monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: 0)
        assert (is_distributed(), is_main_process()) == (True, True)  # rank 0 writes the files
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.parametrize("device, waited", [("cuda:1", ["cuda:1"]), ("mps", ["mps"]), ("cpu", [])])
def test_synchronize_waits_for_the_gpu_it_is_given(monkeypatch, device, waited):
    """MPS queues work like CUDA: a timer that waited for CUDA only measured how fast MPS steps were queued."""
    from mtlearn.utils import synchronize

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    synchronize(torch.device(device))
    assert calls == waited


def test_numpy_integers_and_bools_become_python_ones_too():
    """Counts and flags are NumPy integers and bools as often as metrics are floats: a np.int64 in metrics.json
    is a TypeError, in a checkpoint a refused file; a NumPy switch is a switch."""
    from mtlearn.utils import check_bool, python_numbers, to_jsonable

    converted = to_jsonable({"n": np.int64(3), "ok": np.bool_(True)})
    assert converted == {"n": 3, "ok": True} and type(converted["n"]) is int and type(converted["ok"]) is bool
    assert type(python_numbers(np.int64(3))) is int and type(python_numbers(np.bool_(False))) is bool
    assert check_bool("augment", np.True_) is True and check_bool("augment", np.False_) is False


def test_a_history_is_written_as_its_records_and_other_objects_are_named_briefly():
    """run.finish({"history": history}) raised a TypeError that printed the whole History."""
    from mtlearn.engine import History
    from mtlearn.utils import to_jsonable

    history = History(monitor="val/dice")
    history.append({"epoch": 1, "val/dice": np.float32(0.5)})
    assert to_jsonable({"history": history}) == {"history": [{"epoch": 1, "val/dice": 0.5}]}
    history.append({"epoch": 2, "val/dice": 0.123456789, "val/auc": float("nan")})  # rounded, NaN as null: JSON
    assert to_jsonable(history, digits=3)[1] == {"epoch": 2, "val/dice": 0.123, "val/auc": None}
    with pytest.raises(TypeError, match=r"got Linear: Linear\(in_features=2, out_features=2, bias=True\)$"):
        to_jsonable(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"got set: \{.{76}\.\.\.$"):  # cut at 80 characters
        to_jsonable(set(range(100)))


def test_python_numbers_turns_numpy_arrays_into_lists_of_python_numbers():
    """sklearn's compute_class_weight returns an array; one NumPy object in a checkpoint makes
    torch.load(weights_only=True) refuse the whole file."""
    import io

    from mtlearn.utils import python_numbers

    converted = python_numbers({"class_weights": np.array([0.5, 2.0]), "grid": (np.arange(4).reshape(2, 2),),
                                "gamma": np.array(2.0), "lr": np.float32(0.5), "name": "dicefocal"})
    assert converted == {"class_weights": [0.5, 2.0], "grid": ([[0, 1], [2, 3]],), "gamma": 2.0, "lr": 0.5,
                         "name": "dicefocal"}
    assert type(converted["class_weights"][0]) is float and type(converted["grid"][0][1][0]) is int
    assert type(converted["gamma"]) is float  # a 0-d array: one number, not a list
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == converted
    from collections import namedtuple

    Pair = namedtuple("Pair", "low high")  # its constructor takes the fields, not one iterable (was a TypeError)
    pair = python_numbers(Pair(np.float32(0.5), 2))
    assert pair == Pair(0.5, 2) and type(pair) is Pair and type(pair.low) is float  # not np.float32 == 0.5


def test_write_json_writes_null_for_what_json_cannot_say_and_plain_numbers(tmp_path):
    """metrics.json and options.json go through it: literal NaN is not JSON, strict readers refuse it."""
    import json

    from mtlearn.utils import write_json

    path = tmp_path / "record.json"
    write_json({"a": float("nan"), "b": np.float32(1.5), "c": torch.tensor(2), "d": [float("inf")]}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": 1.5, "c": 2, "d": [None]}


def test_check_number_names_the_option_the_range_and_the_fix():
    from mtlearn.utils import check_number

    value = check_number("lr", np.float32(0.5), 0, above=True)
    assert value == 0.5 and type(value) is float  # a Python float: NumPy ones make checkpoints unreadable
    assert check_number("rate", 0, 0, 1) == 0.0 and check_number("rate", 1, 0, 1) == 1.0  # closed ends allowed
    assert check_number("r", -1, -1, 1) == -1.0
    for bad, match in [
        (0, r"lr must be a finite number > 0 \(e\.g\. 1e-4\), got 0$"),  # `above`: the bound itself is refused
        (float("nan"), r"lr must be a finite number > 0 .*got nan"),  # NaN fails every comparison
        (float("inf"), r"lr must be a finite number > 0 .*got inf"),  # inf passes `> 0`
        ("1e-3", r"got '1e-3'; pass it unquoted"),  # a config file's string
        (True, r"got True$"),  # a bool is not a number
        (None, r"got None$"),
        (10**400, r"lr must be a finite number > 0 .*got 1000"),  # has no float (was an OverflowError)
    ]:
        with pytest.raises(ValueError, match=match):
            check_number("lr", bad, 0, above=True, advice="e.g. 1e-4")
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\], got -1000"):
        check_number("rate", -10**400, 0, 1)  # out of range: the range message, not math.isfinite's OverflowError
    assert check_number("big", 10**300, 0) == 1e300  # an int a float can hold is fine
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1$"):
        check_number("momentum", 1, 0, 1, below=True)
    with pytest.raises(ValueError, match=r"c must be a number in \(-1, 1\], got -1$"):
        check_number("c", -1, -1, 1, above=True)
    with pytest.raises(ValueError, match=r"decay must be a finite number >= 0, got -0\.1$"):
        check_number("decay", -0.1, 0)


def test_write_text_is_utf8_and_leaves_the_old_file_and_no_temporary_one_on_failure(tmp_path):
    """The temporary file was written in the locale's encoding (ASCII on some machines: 'bénin' failed) and left
    behind when writing failed; its fixed name let two writers remove each other's; the file's mode was lost."""
    path = tmp_path / "table.csv"
    write_text("label,acc\nbénin,0.9\n", path)
    assert path.read_bytes() == "label,acc\nbénin,0.9\n".encode("utf-8")
    path.chmod(0o640)  # not mkstemp's 0o600: a mode the replacement could only have by keeping it
    with pytest.raises(UnicodeEncodeError):
        write_text("\ud800", path)  # a lone surrogate: no encoding writes it
    assert path.read_text(encoding="utf-8") == "label,acc\nbénin,0.9\n" and os.listdir(tmp_path) == ["table.csv"]
    # where the locale is ASCII (LC_ALL=C, no UTF-8 mode), the text is still written as UTF-8
    script = ("from pathlib import Path; from mtlearn.utils import write_text; "
              f"write_text('b\\u00e9nin', Path({str(path)!r}))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parents[1])
    assert path.read_bytes() == "bénin".encode("utf-8")
    write_text("label,acc\nbénin,0.9\n", path)
    write_text("new\n", path)
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o640  # its mode kept
    umask = os.umask(0)
    os.umask(umask)
    write_text("x", tmp_path / "fresh.txt")  # a new file: the mode any new file gets
    assert stat.S_IMODE((tmp_path / "fresh.txt").stat().st_mode) == 0o666 & ~umask
    errors = []

    def writer(k):
        try:
            for i in range(50):
                write_text(f"{k} {i}", path)
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(os.listdir(tmp_path)) == ["fresh.txt", "table.csv"]
