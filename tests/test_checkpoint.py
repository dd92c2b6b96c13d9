"""Checkpoint plumbing: atomic files, weights_only reading, random-state round trips, folder and option checks."""

import collections
import contextlib
import os
import pickle
import random
import re
import sys
import traceback
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from mtlearn.checkpoint import (
    OutDirInUseError,
    UnreadableCheckpointError,
    check_out_dir,
    check_resume_options,
    load_checkpoint,
    out_dir_lock,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def small_model(num_classes=3):
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))


# ---------------------------------------------------------------------------------------------- files


def test_a_path_from_the_home_folder_is_expanded_as_notebook_start_does(tmp_path, monkeypatch):
    """"~/x.pt" was a folder named "~" in the working folder, and load_checkpoint then found no checkpoint."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    save_checkpoint({"epoch": 1}, "~/x.pt")
    assert (tmp_path / "x.pt").is_file() and load_checkpoint("~/x.pt") == {"epoch": 1}
    with pytest.raises(ValueError, match=rf"out_dir {re.escape(str(tmp_path))} already holds x.pt of an earlier run"):
        check_out_dir("~", resume=False, writes="x.pt", cli=False, also_kept=("x.pt",))


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, tmp_path / "last.pt")
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the object
        save_checkpoint({"epoch": 2, "broken": lambda: None}, path)  # a lambda cannot be pickled
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("state, says", [
    ({"model": nn.Linear(2, 2)}, r"state holds torch.nn.modules.linear.Linear, which load_checkpoint \(torch.load "
                                 r"with weights_only=True, which runs no code\) cannot read back; nothing was written"),
    ({"rng": {"numpy": [np.float32(0.5)]}}, r"state holds numpy\..*utils.python_numbers turns NumPy numbers into"),
    ({"counts": collections.defaultdict(int)}, r"state holds .*collections.defaultdict"),
    (nn.Linear(2, 2), r"save_checkpoint takes a dict, not a Linear; pass e.g. \{'model': model.state_dict\(\)\}"),
    # a list of pairs was saved, then read back as no dict
    ([("model", torch.zeros(1))], r"save_checkpoint takes a dict of tensors, numbers and strings, got a list"),
])
def test_what_load_checkpoint_could_not_read_back_is_refused_when_saving(tmp_path, state, says):
    """torch.save took a module or a NumPy number, and load_checkpoint (weights_only) then called the file
    corrupt: the run's checkpoints were all unreadable, found only at the resume."""
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(TypeError, match=says):
        save_checkpoint(state, path)
    assert os.listdir(tmp_path) == ["last.pt"] and load_checkpoint(path) == {"epoch": 1}  # the previous file stays
    plain = {"a": [torch.ones(1), (1, 2.5, "x", None, True)], "b": {3, 4}, "c": {(1, 2): torch.float16}, "d": 1 + 2j}
    assert load_checkpoint(save_checkpoint(plain, tmp_path / "ok.pt")) == plain  # what it does read back


def test_a_folder_given_as_the_checkpoint_is_named_with_the_fix(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder; give the checkpoint's file name, e.g. "
                                                rf"{tmp_path / 'last.pt'}"):
        save_checkpoint({"epoch": 1}, tmp_path)


def test_a_save_that_fails_midway_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, tmp_path / "last.pt")

    def disk_full_halfway(obj, f):
        f.write(b"PK\x03\x04 the first bytes of a zip archive")  # torch.save had begun writing
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


class _Foreign:
    """An object torch.load(weights_only=True) refuses to build."""


@pytest.mark.parametrize("content", ["empty", "text", "truncated", "foreign object", "whole model", "numpy number",
                                     "plain state_dict", "tensors and other values"])
def test_load_checkpoint_refuses_a_corrupt_or_foreign_file(content, tmp_path):
    path = tmp_path / "model.pt"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "truncated":
        save_checkpoint({"model": small_model().state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "foreign object":
        torch.save({"model": _Foreign()}, path)
    elif content == "whole model":  # torch.save(model): a pickled module, not "corrupt or truncated"
        torch.save(small_model(), path)
    elif content == "numpy number":  # saved without save_checkpoint's check: np.float64(0.9) for a best score
        torch.save({"model": small_model().state_dict(), "best": np.float64(0.9)}, path)
    elif content == "plain state_dict":  # torch.save(model.state_dict()): weights, but not in an mtlearn checkpoint
        torch.save(small_model().state_dict(), path)
    else:  # one tensor does not make a state_dict: {"w": ..., "epoch": 1} is someone else's checkpoint
        torch.save({"w": torch.zeros(2), "epoch": 1}, path)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path, small_model())
    message = str(caught.value)
    if content == "plain state_dict":  # readable weights: say how to load them, not "corrupt"
        assert message == (f"{path} holds a plain state_dict (torch.save(model.state_dict())), not an mtlearn "
                           "checkpoint; load it with model.load_state_dict(torch.load(path, weights_only=True))")
    elif content in ("foreign object", "whole model", "numpy number"):  # readable only by running the code it names
        kind, fix = {"foreign object": ("tests.test_checkpoint._Foreign", "save only tensors, numbers, strings"),
                     "whole model": ("torch.nn.modules.container.Sequential", "save model.state_dict() instead of"),
                     "numpy number": ("numpy.", "turn NumPy numbers and arrays into Python ones first")}[content]
        assert message.startswith(f"{path} holds a pickled Python object ({kind}") and fix in message
        assert "which load_checkpoint does not unpickle, as that runs code from the file" in message
    else:
        assert message.startswith(f"cannot read {path}: it is not an mtlearn checkpoint") and "corrupt" in message
        assert isinstance(caught.value, UnreadableCheckpointError)  # what a resume catches to offer best.pt
        # every writer named, not fit's last.pt and best.pt alone (a comparison's result.pt was told of those)
        assert "fit, train_disentangle and a UMS-Rep comparison" in message
    # torch's advice to unpickle untrusted code is passed on neither in the message nor in the traceback
    assert "weights_only=False" not in "".join(traceback.format_exception(caught.value))
    assert "weights_only" not in "".join(traceback.format_exception(caught.value)).replace("weights_only=True", "")


def test_every_kind_of_damage_is_named_as_such(tmp_path):
    """A file cut short or with a few bytes changed fails inside torch.load in many ways (OSError, IndexError,
    RuntimeErrors of the zip reader, NotImplementedError): each is "corrupt or truncated", for
    load_checkpoint and for check_out_dir alike. (Cut at half its size, this one gave OSError.)"""
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "epoch": 3, "config": {"epochs": 9}, "rng": rng_state()}, good)
    raw = good.read_bytes()
    rng = random.Random(0)
    damaged = [raw[:cut] for cut in (len(raw) // 2, len(raw) - 1, len(raw) - 22, 100, *rng.sample(range(len(raw)), 40))]
    for _ in range(120):
        changed = bytearray(raw)
        for position in rng.sample(range(len(raw)), rng.randint(1, 4)):
            changed[position] = rng.randrange(256)
        damaged.append(bytes(changed))
    run = tmp_path / "run"
    run.mkdir()
    escaped = []
    for content in damaged:
        (run / "last.pt").write_bytes(content)
        try:
            state = load_checkpoint(run / "last.pt")
        except ValueError as error:
            assert "corrupt or truncated" in str(error)
            with pytest.raises(ValueError, match=re.escape("already holds a run (last.pt, unreadable)")):
                check_out_dir(run, resume=False)
        except Exception as error:  # noqa: BLE001 - the test is that nothing else comes out
            escaped.append(f"{type(error).__name__}: {error}"[:120])
        else:  # only a change that alters nothing read (the zip's alignment padding) may load, and unchanged
            assert torch.equal(state["model"]["w"], torch.load(good, weights_only=True)["model"]["w"])
    assert not escaped, escaped


def test_a_byte_changed_inside_a_tensor_is_found(tmp_path):
    """torch checks no CRC: a flipped byte in a weight loaded silently as another weight (a copy to Drive cut
    off and resumed, a bad disk sector)."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000), "empty": torch.zeros(0)}}, path)  # CRC 0: still checked
    raw = bytearray(path.read_bytes())
    position = bytes(raw).index(bytes(4000))  # the tensor's 4000 zero bytes
    raw[position + 2000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UnreadableCheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module."])
def test_the_weights_of_a_compiled_or_ddp_wrapped_model_load_into_the_plain_model(prefix, tmp_path):
    """torch.compile(model).state_dict() names every weight "_orig_mod.<name>", DistributedDataParallel's
    "module.<name>": load_checkpoint(path, plain_model) said the file was "written for another model"."""
    trained = small_model()
    weights = (torch.compile(trained) if prefix == "_orig_mod." else types.SimpleNamespace(
        state_dict=lambda: {f"module.{k}": v for k, v in trained.state_dict().items()})).state_dict()
    assert all(k.startswith(prefix) for k in weights)
    save_checkpoint({"model": weights}, tmp_path / "best.pt")
    plain = small_model()
    load_checkpoint(tmp_path / "best.pt", plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), trained.state_dict().values()))


def test_a_checkpoint_written_without_crcs_is_not_called_corrupt(tmp_path):
    """torch can be told not to compute CRCs (save.compute_crc32 = False): every CRC 0, and the file loads."""
    serialization = pytest.importorskip("torch.utils.serialization", reason="torch < 2.6 has no save config")

    with serialization.config.patch({"save.compute_crc32": False}):
        save_checkpoint({"model": small_model().state_dict(), "epoch": 2}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt", small_model())["epoch"] == 2


def test_weights_of_compile_inside_ddp_load_and_plain_weights_load_into_a_wrapped_model(tmp_path):
    trained = small_model()
    both = {f"module._orig_mod.{k}": v for k, v in trained.state_dict().items()}  # DDP(torch.compile(model))
    save_checkpoint({"model": both}, tmp_path / "both.pt")
    plain = small_model()
    load_checkpoint(tmp_path / "both.pt", plain)
    assert torch.equal(plain[0].weight, trained[0].weight)
    save_checkpoint({"model": trained.state_dict()}, tmp_path / "plain.pt")
    inner = small_model()
    load_checkpoint(tmp_path / "plain.pt", torch.compile(inner))  # "written for another model" before
    assert torch.equal(inner[0].weight, trained[0].weight)
    nested = small_model()
    load_checkpoint(tmp_path / "plain.pt", nn.DataParallel(torch.compile(nested)))  # every wrapper taken off
    assert torch.equal(nested[0].weight, trained[0].weight)
    named = nn.Sequential(collections.OrderedDict(module=small_model()))  # a model whose own names start "module."
    save_checkpoint({"model": named.state_dict()}, tmp_path / "named.pt")
    load_checkpoint(tmp_path / "named.pt", nn.Sequential(collections.OrderedDict(module=small_model())))


def test_weights_of_another_model_are_refused_with_a_few_names_and_counts(tmp_path):
    """load_state_dict lists every missing name (about 190 for a ResFormer, several kB in one message)."""
    big = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])
    save_checkpoint({"model": big.state_dict()}, tmp_path / "big.pt")
    with pytest.raises(ValueError) as caught:
        load_checkpoint(tmp_path / "big.pt", small_model())
    message = str(caught.value)
    assert "(3 missing key(s), e.g. 1.num_batches_tracked, 1.running_mean, 1.running_var; " in message
    assert "; 94 unexpected key(s), e.g. 10.bias, 10.weight, 11.bias)" in message and len(message) < 500
    save_checkpoint({"model": small_model(num_classes=5).state_dict()}, tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"another model .*\(size mismatch for 2\.weight: .*; size mismatch for "
                                         r"2\.bias: .*\)$"):
        load_checkpoint(tmp_path / "five.pt", small_model())


def _leave_mark(path):
    """What a tampered checkpoint could run while being unpickled (here: only create a file)."""
    with open(path, "w") as f:
        f.write("ran")
    return {}


class _RunsCodeWhenUnpickled:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return _leave_mark, (self.mark,)


def test_a_file_whose_model_entry_is_no_state_dict_is_named(tmp_path):
    """load_weights caught load_state_dict's RuntimeErrors only: this gave its bare TypeError."""
    path = save_checkpoint({"model": [1, 2]}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"cannot load .*foreign.pt into this model.*\(its weights are a list, not "
                                         r"a state_dict\)"):
        load_checkpoint(path, nn.Linear(2, 2))


def test_loading_runs_no_code_from_the_file(tmp_path):
    mark = tmp_path / "ran.txt"
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "epoch": 1, "payload": _RunsCodeWhenUnpickled(str(mark))}, path)
    with pytest.raises(ValueError, match=r"holds a pickled Python object \(tests\.test_checkpoint\._leave_mark\), "
                                         r"which load_checkpoint does not unpickle, as that runs code from the file"):
        load_checkpoint(path)
    assert not mark.exists()


def test_the_engine_keeps_exporting_the_file_functions():
    from mtlearn import checkpoint, engine

    assert engine.save_checkpoint is checkpoint.save_checkpoint and engine.load_checkpoint is checkpoint.load_checkpoint


# ---------------------------------------------------------------------------------------------- random states


def draws(loader) -> list:
    """A few draws from every generator rng_state covers (the Gaussians use NumPy's and Python's caches)."""
    return [torch.rand(3).tolist(), np.random.rand(2).tolist(), float(np.random.standard_normal()),
            random.random(), random.gauss(0, 1), [batch.tolist() for batch in loader]]


@pytest.mark.parametrize("owner", ["loader", "sampler", "batch_sampler"])
def test_random_states_round_trip_through_a_checkpoint(owner, tmp_path):
    """batch_sampler: its sampler's generator was not saved (the loader's `sampler` is then another one)."""
    data = list(range(10))
    generator = torch.Generator().manual_seed(0)
    loader = {"loader": lambda: DataLoader(data, batch_size=4, shuffle=True, generator=generator),
              "sampler": lambda: DataLoader(data, batch_size=4, sampler=RandomSampler(data, generator=generator)),
              "batch_sampler": lambda: DataLoader(data, batch_sampler=BatchSampler(
                  RandomSampler(data, generator=generator), 4, drop_last=False))}[owner]()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.standard_normal(), random.gauss(0, 1)  # each now holds a cached second Gaussian
    path = save_checkpoint({"rng": rng_state(loader)}, tmp_path / "last.pt")
    first = draws(loader)
    assert draws(loader) != first  # every generator moved on
    set_rng_state(load_checkpoint(path)["rng"], loader)  # through weights_only, as a resume reads it
    assert draws(loader) == first
    assert f"{owner}_generator" in load_checkpoint(path)["rng"]


def test_random_states_saved_without_a_loader_leave_a_loaders_generator_as_it_is():
    """A state saved with no loader (rng_state(None)) has no entry for the loader's generator: restoring it
    into a loader that has one keeps that generator's state (its order is then the loader's own)."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(list(range(10)), batch_size=4, shuffle=True, generator=generator)
    state = rng_state(None)
    before = generator.get_state()
    set_rng_state(state, loader)
    assert torch.equal(generator.get_state(), before)


# ---------------------------------------------------------------------------------------------- checks


def test_a_checkpoint_of_another_writer_is_refused_naming_every_missing_key(tmp_path):
    from mtlearn.checkpoint import check_checkpoint_keys

    check_checkpoint_keys(tmp_path / "last.pt", {"model": {}, "optimizer": {}}, ("model", "optimizer"), "fit")
    with pytest.raises(ValueError, match=re.escape(f"cannot resume from {tmp_path / 'last.pt'}: it is not a checkpoint "
                                                   "written by fit (it has no 'model', 'optimizer')")):
        check_checkpoint_keys(tmp_path / "last.pt", {"epoch": 1}, ("model", "optimizer"), "fit")


@pytest.mark.parametrize("frozen, listed", [(4, "p0.weight, p1.weight, p2.weight, p3.weight; "),
                                            (5, "p0.weight, p1.weight, p2.weight, p3.weight and 1 more; ")])
def test_the_refusal_to_resume_with_other_parameters_frozen_names_four_and_counts_the_rest(frozen, listed, tmp_path):
    from mtlearn.checkpoint import check_trainable, trainable_names

    model = nn.ModuleDict({f"p{k}": nn.Linear(1, 1, bias=False) for k in range(6)})
    saved = trainable_names(model)
    for k in range(frozen):
        model[f"p{k}"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape(f"(frozen now: {listed}training now: none)")):
        check_trainable(tmp_path / "last.pt", saved, model, model.state_dict())


def test_an_out_dir_holding_a_run_is_refused_without_resume(tmp_path):
    save_checkpoint({"epoch": 3, "config": {"epochs": 5}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {tmp_path} already holds a run (last.pt, epoch 3 of 5): for a new run choose another out_dir "
            "(CLI: --out-dir) or delete this one; to continue that run pass resume=True (CLI: --resume)")):
        check_out_dir(tmp_path, resume=False)
    with pytest.raises(ValueError, match=r"choose another out_dir or delete this one; .* pass resume=True$"):
        check_out_dir(tmp_path, resume=False, cli=False)  # no command line to name
    check_out_dir(tmp_path, resume=True)  # continuing it is fine
    check_out_dir(tmp_path / "new", resume=False)  # so is a folder without a run


def test_a_best_checkpoint_kept_without_its_last_pt_is_not_overwritten(tmp_path):
    save_checkpoint({"epoch": 7}, tmp_path / "best.pt")  # last.pt deleted to save space, the best weights kept
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {tmp_path} already holds best.pt of an earlier run (without its last.pt), which a new run "
            "would overwrite: choose another out_dir (CLI: --out-dir) or move best.pt away first")):
        check_out_dir(tmp_path, resume=False)
    with pytest.raises(ValueError, match=re.escape(  # resuming would start over without last.pt, overwriting it too
            f"out_dir {tmp_path} has no last.pt to resume from, and holds best.pt of an earlier run (without its "
            "last.pt), which a new run would overwrite")):
        check_out_dir(tmp_path, resume=True)
    check_out_dir(tmp_path, resume=False, also_kept=())  # a caller that writes no best.pt
    with pytest.raises(ValueError, match=r"already holds result.pt .* or move result.pt away first$"):
        save_checkpoint({"record": {}}, tmp_path / "result.pt")
        check_out_dir(tmp_path, resume=False, cli=False, also_kept=("result.pt",))


def test_an_out_dir_another_live_run_holds_is_refused_naming_it(tmp_path, held_by_another_run):
    """Two runs into one folder both passed check_out_dir before either wrote last.pt, and mixed their files."""
    pid = held_by_another_run(tmp_path / "run")
    with pytest.raises(OutDirInUseError, match=re.escape(f"another run is writing to --out-dir {tmp_path / 'run'} "
                                                         f"(process {pid} on ")) as caught:
        with out_dir_lock(tmp_path / "run", "--out-dir"):
            pytest.fail("entered a folder another run holds")
    assert "wait for it to end, or choose another --out-dir" in str(caught.value)
    assert str(tmp_path / "run" / ".lock") in str(caught.value)  # to delete when the holder is on another machine
    assert isinstance(caught.value, ValueError)  # the command lines' one-line errors
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"{pid} on ")  # the holder's lock is left alone


def test_out_dir_lock_is_held_while_a_run_lives_and_gone_after(tmp_path):
    folder = tmp_path / "runs" / "a"
    with out_dir_lock(folder):
        assert (folder / ".lock").read_text().startswith(f"{os.getpid()} on ")
        with out_dir_lock(folder / ".." / "a"):  # the command line holds it, then fit inside it: the same path
            (folder / "last.pt").write_text("")
        assert (folder / ".lock").is_file()  # the inner run does not release the outer one's lock
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    with out_dir_lock(folder):  # released: the next run takes it
        assert (folder / ".lock").is_file()


def test_out_dir_lock_holds_one_folder_however_it_is_named(tmp_path, monkeypatch):
    """Relative, absolute, from the home folder: one folder, one lock (the inner run took the outer's lock over,
    its own process's, and released it, leaving the folder unheld while the outer run still wrote)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for outer, inners in [("runs/a", (tmp_path / "runs" / "a", "~/runs/a")), (tmp_path / "runs" / "a", ("runs/a",))]:
        with out_dir_lock(outer):
            for name in inners:
                with out_dir_lock(name):
                    pass
                assert (tmp_path / "runs" / "a" / ".lock").is_file()
    with out_dir_lock("~/b"):
        assert (tmp_path / "b" / ".lock").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("failing", [False, True])
def test_out_dir_lock_leaves_no_folder_it_made_for_a_run_that_wrote_nothing(tmp_path, failing):
    """A refused run (bad options found after the lock) left an empty folder, where it had left none."""
    (tmp_path / "kept").mkdir()
    for folder in (tmp_path / "new" / "deeper", tmp_path / "kept"):
        with contextlib.suppress(ValueError), out_dir_lock(folder):
            assert folder.is_dir()
            if failing:
                raise ValueError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_out_dir_lock_makes_the_folder_again_when_another_run_removed_it_empty(tmp_path,
                                                                             folder_removed_before_its_lock):
    """Another run that made the folder and failed removes it, empty, on its way out; this one's lock then had no
    folder to be made in."""
    with out_dir_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").is_file()
    assert folder_removed_before_its_lock == [str(tmp_path / "run")]


def test_out_dir_lock_takes_over_a_killed_runs_lock(tmp_path):
    import socket
    import subprocess

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp_path.joinpath(".lock").write_text(f"{gone.stdout.strip()} on {socket.gethostname()}\n")
    with out_dir_lock(tmp_path):
        assert tmp_path.joinpath(".lock").read_text().startswith(f"{os.getpid()} on ")
    assert not tmp_path.joinpath(".lock").exists()


def test_out_dir_lock_holds_nothing_without_a_folder_or_outside_the_main_process(tmp_path, monkeypatch):
    with out_dir_lock(None), out_dir_lock(5):  # 5: refused by the caller's own check, with its own message
        pass
    from mtlearn import checkpoint
    monkeypatch.setattr(checkpoint, "is_main_process", lambda: False)  # torchrun's other processes write nothing
    with out_dir_lock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


def test_an_out_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'notes.txt'} is a file. Choose another out_dir "
                                                   "(it receives last.pt)")):
        check_out_dir(tmp_path / "notes.txt" / "run", resume=False, writes="last.pt")


def test_resuming_with_other_options_names_each_change(tmp_path):
    saved = {"lr": 1e-3, "tasks": ["seg", "cls"], "seed": 0}
    check_resume_options(tmp_path / "last.pt", saved, {**saved, "added_later": 1}, [*saved, "added_later"])
    with pytest.raises(ValueError, match=re.escape(
            f"cannot resume from {tmp_path / 'last.pt'} with other options (lr: 0.001 then, 0.0001 now; tasks: "
            "['seg', 'cls'] then, ['seg'] now). Resume with the options of that run, or start a new run in another "
            "out_dir")):
        check_resume_options(tmp_path / "last.pt", saved, {**saved, "lr": 1e-4, "tasks": ["seg"], "seed": 1},
                             ["lr", "tasks"])  # seed is not among the names compared


def test_resume_notes_explain_only_the_options_that_changed(tmp_path):
    """A name like fit's steps_per_epoch does not say what to keep: its note does, when it is the one that changed."""
    saved = {"lr": 1e-3, "steps_per_epoch": 4}
    notes = {"steps_per_epoch": "steps_per_epoch is the loader's number of batches: keep the batch size",
             "lr": "never shown here"}
    with pytest.raises(ValueError, match=re.escape(
            "(steps_per_epoch: 4 then, 2 now). steps_per_epoch is the loader's number of batches: keep the batch "
            "size. Resume with the options of that run")) as caught:
        check_resume_options(tmp_path / "last.pt", saved, {**saved, "steps_per_epoch": 2}, list(saved), notes)
    assert "never shown" not in str(caught.value)
    check_resume_options(tmp_path / "last.pt", {"lr": 1e-3}, {**saved, "steps_per_epoch": 2}, list(saved), notes)


# ---------------------------------------------------------------------------------------------- mutation audit
# Tests that pin down what surviving mutants of checkpoint.py changed unnoticed.


def test_save_replaces_the_file_instead_of_writing_into_it(tmp_path):
    """A rename gives `path` a new file: a reader still holding the old one (here a hard link to it) keeps
    reading a whole old checkpoint, never a half-written new one (writing into the file in place would)."""
    path = save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, tmp_path / "last.pt")
    os.link(path, tmp_path / "reader.pt")
    save_checkpoint({"epoch": 2, "weights": torch.zeros(3)}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(tmp_path / "reader.pt")["epoch"] == 1


def test_any_mapping_is_saved_as_a_plain_dict(tmp_path):
    # a read-only view (or a user's own Mapping class) would otherwise be pickled as its class, which
    # weights_only loading refuses
    path = save_checkpoint(types.MappingProxyType({"epoch": 3, "weights": torch.ones(2)}), tmp_path / "last.pt")
    state = load_checkpoint(path)
    assert type(state) is dict and state["epoch"] == 3 and torch.equal(state["weights"], torch.ones(2))


def test_a_cuda_error_on_a_machine_with_a_gpu_is_not_blamed_on_a_missing_gpu(tmp_path, monkeypatch):
    # "this machine has no CUDA GPU" is the advice only where there is none; an out-of-memory error while
    # loading onto a GPU that exists must come through as itself. The load goes to the CPU unless told.
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    asked = []

    def out_of_memory(*args, map_location=None, **kwargs):
        asked.append(map_location)
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "load", out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        load_checkpoint(path)
    assert asked == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"onto 'cuda': this machine has no CUDA GPU; use map_location='cpu'"):
        load_checkpoint(path, map_location="cuda")


def test_an_empty_dict_or_folder_is_named_as_such(tmp_path):
    torch.save({}, tmp_path / "empty.pt")  # no weights at all: not "a plain state_dict"
    with pytest.raises(ValueError, match="it is not an mtlearn checkpoint"):
        load_checkpoint(tmp_path / "empty.pt", nn.Linear(2, 2))
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a checkpoint; .*\(it holds no \.pt file\)"):
        load_checkpoint(tmp_path / "run")


def test_load_checkpoint_honours_map_location(tmp_path):
    path = save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, tmp_path / "last.pt")
    assert load_checkpoint(path, map_location="meta")["weights"].device.type == "meta"
    assert load_checkpoint(path)["weights"].device.type == "cpu"  # the default


def test_load_checkpoint_names_a_folder_and_a_gpu_this_machine_lacks(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, tmp_path / "best.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} is a folder, not a checkpoint; load one in "
                                                          f"it, e.g. {path} (it holds ['best.pt'])")):
        load_checkpoint(tmp_path)

    def load_on_a_cpu_machine(*args, **kwargs):  # what torch.load says there (the test runs where a GPU is too)
        raise RuntimeError("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "load", load_on_a_cpu_machine)
    with pytest.raises(ValueError, match=r"onto 'cuda': this machine has no CUDA GPU; use map_location='cpu'"):
        load_checkpoint(path, map_location="cuda")


def test_an_unreadable_run_in_the_out_dir_is_still_refused_and_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"out_dir {tmp_path} already holds a run (last.pt, unreadable): "
                                                   "for a new run choose another out_dir")):
        check_out_dir(tmp_path, resume=False)


def test_only_rank_0_warns_that_the_random_states_are_another_runs(monkeypatch):
    """Each process of a resumed torchrun run printed the warning; rank 0 says it once."""
    import mtlearn.checkpoint as checkpoint

    state = rng_state()
    state["ranks"] = [dict(state), dict(state)]  # saved by 2 processes
    monkeypatch.setattr(checkpoint, "world_and_rank", lambda: (3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state(state)


@pytest.mark.parametrize("saved_by, world, rank, applied", [(1, 1, 0, 0), (2, 2, 1, 1), (2, 1, 0, None)])
def test_each_process_restores_its_own_cuda_state_or_warns(saved_by, world, rank, applied, monkeypatch):
    """GPU-only code, run on the CPU with a fake GPU: rank k takes the k-th saved CUDA state; a checkpoint of
    another number of processes has none that belongs to this one, so nothing is applied and a warning says so."""
    import mtlearn.checkpoint as checkpoint

    state = rng_state()  # before the fake GPU: it has no "cuda" states to gather
    state["cuda"] = [torch.full((8,), k, dtype=torch.uint8) for k in range(saved_by)]
    if saved_by > 1:  # and each process's CPU generators, as rng_state gathers them under torchrun
        state["ranks"] = [{**state, "torch": torch.Generator().manual_seed(100 + k).get_state()}
                          for k in range(saved_by)]
    applied_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": applied_states.append(new_state))
    monkeypatch.setattr(checkpoint, "world_and_rank", lambda: (world, rank))
    if applied is None:
        with pytest.warns(UserWarning, match=re.escape(
                "the checkpoint holds the random states of 2 process(es), this run has 1: dropout and drop-path "
                "will differ from an uninterrupted run")):
            set_rng_state(state)
        assert applied_states == []  # not another process's state
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # its own state is there: nothing to warn about
            set_rng_state(state)
        assert len(applied_states) == 1 and applied_states[0] is state["cuda"][applied]
        if saved_by > 1:  # the CPU generator too: this process's own
            assert torch.equal(torch.get_rng_state(), state["ranks"][rank]["torch"])


@pytest.mark.parametrize("device, used", [(None, "cuda"), ("cpu", None), ("cuda:1", "cuda:1"),
                                          (torch.device("cuda:1"), torch.device("cuda:1"))])
def test_the_cuda_state_is_that_of_the_gpu_training_runs_on(device, used, monkeypatch):
    """fit(device="cuda:1") leaves GPU 0 the current one: the state saved and restored must be GPU 1's,
    whose generator its dropout draws from ("cuda": torch's name for the current GPU). A run on the CPU draws
    from no GPU's generator, and asking one for its state started CUDA on GPU 0 (a context per torchrun
    process on a GPU machine). Fake GPU, on the CPU."""
    import mtlearn.checkpoint as checkpoint

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": asked.append(device) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": asked.append(device))
    monkeypatch.setattr(checkpoint, "world_and_rank", lambda: (1, 0))
    set_rng_state(rng_state(device=device), device=device)
    assert asked == ([used, used] if used is not None else [])
    asked.clear()  # a GPU run's checkpoint resumed on the CPU: it set GPU 0's state, starting CUDA there
    set_rng_state({**rng_state(device="cpu"), "cuda": [torch.zeros(8)]}, device=device)
    assert asked == ([used] if used is not None else [])


@pytest.mark.parametrize("error", [RuntimeError("PytorchStreamReader failed reading zip archive: too many files"),
                                   KeyError("model"), pickle.UnpicklingError("Weights only load failed"),
                                   EOFError("Ran out of input")])
def test_errors_that_only_a_damaged_or_foreign_file_gives_are_named_even_when_the_zip_is_intact(error, tmp_path,
                                                                                                monkeypatch):
    """torch's zip reader refuses some headers Python's zipfile accepts; weights_only refuses foreign objects."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": small_model().state_dict()}, path)

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(ValueError, match="not an mtlearn checkpoint .* or it is corrupt or truncated"):
        load_checkpoint(path)


def test_a_failure_that_is_not_the_files_is_not_called_corrupt(tmp_path, monkeypatch):
    """Only the zip reader's errors mean a damaged file; out of memory must not say "corrupt or truncated"."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": small_model().state_dict()}, path)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        load_checkpoint(path)


def test_resume_is_refused_when_the_same_parameters_train_in_another_order(tmp_path):
    """The optimiser's moments are a list in parameter order: the same names in another order (modules built in
    another order) load them crosswise, which a comparison of the names as sets let through."""
    from mtlearn.checkpoint import check_trainable, trainable_names

    class Pair(nn.Module):
        def __init__(self, first: str):
            super().__init__()
            for name in (first, "b" if first == "a" else "a"):
                self.add_module(name, nn.Linear(2, 2))

    saved = trainable_names(Pair("a"))
    check_trainable(tmp_path / "last.pt", saved, Pair("a"), Pair("a").state_dict())  # as saved: fine
    with pytest.raises(ValueError, match=r"the same parameters train, but the model lists them in another order"):
        check_trainable(tmp_path / "last.pt", saved, Pair("b"), Pair("b").state_dict())
