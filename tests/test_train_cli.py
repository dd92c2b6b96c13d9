import errno
import json
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from mtlearn.data import load_dataset
from mtlearn.data.splits import random_subset
from mtlearn.engine import evaluate, load_checkpoint
from mtlearn.mtl import build_model
from mtlearn.train import main, parse_args
from mtlearn.utils import write_json

SMOKE = ["--preset", "tiny", "--image-size", "32", "--batch-size", "4", "--no-progress"]
# Many tests continue a finished run for more epochs; the warning that the learning rate then jumps is
# tested where it is the point (test_resume_into_a_longer_run_follows_the_longer_schedule).
pytestmark = pytest.mark.filterwarnings("ignore:resuming .* with epochs=")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--tasks", "--weighting", "--resume", "--amp", "--out-dir", "torchrun"):
        assert option in text


def test_help_and_building_a_model_do_not_wait_for_monai():
    """MONAI took ~3 of the ~5 s that `python -m mtlearn.train --help` (or a typo'd option, or mt.build_model)
    waited: losses and metrics imported it at the top. It is imported where a loss or metric is built."""
    code = ("import sys, mtlearn as mt, mtlearn.train as t, mtlearn.engine\n"
            "mt.build_model('tiny', tasks=('seg', 'cls', 'recon'), image_size=32)\n"
            "try:\n    t.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('monai' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_an_out_dir_from_the_home_folder_is_expanded_for_every_file_of_the_run(monkeypatch):
    """Bash leaves --out-dir=~/runs as typed: fit put the checkpoints in $HOME/runs, options.json and
    metrics.json went to ./~/runs, and --resume never found the run's last.pt."""
    monkeypatch.setenv("HOME", "/home/student")
    assert parse_args(["--out-dir=~/runs"]).out_dir == "/home/student/runs"


def test_defaults_name_the_output_folder():
    args = parse_args(["--tasks", "seg", "cls", "recon", "--weighting", "pcgrad", "--seed", "3"])
    assert args.out_dir == "outputs/train/synthetic_64px_tiny_seg+cls+recon_pcgrad_s3"
    # the data's identity is in the name (another dataset or size is another run); the epochs are
    # not (--resume --epochs N continues the same run)
    other = parse_args(["--dataset", "busi", "--data-root", "data", "--image-size", "128", "--epochs", "9"])
    assert other.out_dir == "outputs/train/busi_128px_tiny_seg+cls_fixed_s0"
    assert parse_args(["--preset", "paper", "--dfe", "three"]).out_dir == \
        "outputs/train/synthetic_64px_paper_dfe-three_seg+cls_fixed_s0"  # another model: another folder
    assert parse_args(["--task-weights", "seg=1", "cls=0.5"]).task_weights == {"seg": 1.0, "cls": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--weighting", "magic"], "invalid choice: 'magic'"),
    (["--tasks", "depth"], "invalid choice: 'depth'"),
    (["--task-weights", "seg=high", "cls=1"], "TASK=NUMBER"),
    (["--task-weights", "seg=1"], "one weight per task"),
    (["--task-weights", "seg=-1", "cls=1"], "--task-weights must be finite numbers >= 0, got 'seg=-1'"),
    (["--task-weights", "seg=1", "cls=nan"], "--task-weights must be finite numbers >= 0, got 'cls=nan'"),
    (["--task-weights", "seg=0", "cls=0"], "--task-weights are all 0, so nothing would train"),
    (["--weighting", "dwa", "--task-weights", "seg=1", "cls=1"], "only applies to --weighting fixed"),
    (["--limit", "2"], "--limit must be >= 4"),
    (["--dataset", "nope"], "invalid choice: 'nope'"),
    (["--image-size", "60"], "--image-size must be a multiple of 16 (the network's stride), got 60; try 64"),
    (["--image-size", "56"], "got 56; try 64"),
    (["--image-size", "40"], "got 40; try 32"),
    (["--image-size", "20", "--dataset", "busi"], "got 20; try 16"),  # the real datasets take 16 px
    # refused by the data only after a wait, and without naming the option
    (["--image-size", "16"], "--image-size must be >= 32 for the synthetic data (its smallest size), got 16"),
    (["--tasks", "seg", "seg"], "--tasks lists a task twice (seg seg); give each once"),
    (["--task-weights", "seg=1", "seg=2", "cls=1"], "--task-weights gives 'seg' twice (1 and 2); give each task once"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--out-dir=~no_such_user_here/x"], "--out-dir ~no_such_user_here/x: ~no_such_user_here cannot be expanded (no "
                                         "such user, or no home folder); give the folder's full path"),
    (["--augment"], "--augment applies to real datasets"),
    (["--device", "cdua"], "unknown device 'cdua'"),
    # "" is the working folder: the run's last.pt, best.pt, metrics.json and options.json landed in it
    (["--out-dir", ""], "--out-dir is empty; name a folder for the run, or leave the option out"),
    (["--out-dir", " "], "--out-dir is empty"),
    (["--data-root", " "], "--data-root is empty; name the data folder, or leave the option out"),
    (["--dataset", "breastmnist"], "breastmnist has no lesion masks, so it cannot train seg; use --tasks cls"),
    (["--dataset", "breastmnist", "--tasks", "seg"], "use --tasks cls, or a dataset with masks"),
    # refused once running (after options.json was written), without naming the option
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1, got -1"),
    (["--seed", str(2**32)], "--seed must be an integer from 0 to 2**32 - 1, got 4294967296"),
    # fit's message named its keyword: "use amp='bf16'", which the command line does not take
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA GPU (device is cpu); use --amp bf16 or --amp off"),
    # before any data loads, in the command line's words (fit's says "monitor=")
    (["--tasks", "cls", "--monitor", "seg/dice"], "--monitor seg/dice is not a validation metric of --tasks cls; "
                                                  "choose one of cls/acc, "),
    (["--monitor", "dice"], "--monitor dice is not a validation metric of --tasks seg cls"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_dfe_builds_the_papers_skip_refinement_and_a_resume_keeps_it(tmp_path, capsys):
    """Without --dfe the command line could not train Bui et al.'s network (DFE on every skip connection):
    --preset paper was always the variant without it."""
    from mtlearn.heads import DFE_MODES
    from mtlearn.train import DFE_MODES as OFFERED

    assert OFFERED == DFE_MODES  # the options --help offers are the models'
    out = tmp_path / "run"
    main([*SMOKE, "--dfe", "three", "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    expected = build_model("tiny", tasks=("seg", "cls"), image_size=32, dfe="three")
    plain = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    saved = set(load_checkpoint(out / "best.pt")["model"])
    assert saved == set(expected.state_dict()) and saved != set(plain.state_dict())
    with pytest.raises(SystemExit):
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])  # --dfe forgotten
    assert "--dfe: 'three' then, 'none' now" in capsys.readouterr().err


def test_limit_draws_every_class_of_a_dataset_listed_by_class(tmp_path):
    """A real dataset lists its images by name, so by class (BUSI: benign, malignant, normal); the first
    --limit of each split were all benign, and a quick run scored a one-class test set."""
    from mtlearn.train import _datasets
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "busi", per_class=12)
    args = ["--dataset", "busi", "--data-root", str(tmp_path), "--image-size", "32", "--limit", "12"]
    with pytest.warns(UserWarning, match="no mask file, skipped"):  # the fixture's quirk, said
        splits, _ = _datasets(parse_args(args))
    assert len(splits["train"]) == 12
    assert len({int(splits["train"][i]["label"]) for i in range(12)}) == 3


def test_limit_keeps_that_many_training_images_and_a_quarter_of_it_to_validate_and_test(capsys):
    from mtlearn.train import _datasets

    splits, _ = _datasets(parse_args(["--image-size", "32", "--limit", "10"]))
    assert {name: len(split) for name, split in splits.items()} == {"train": 10, "val": 2, "test": 2}
    assert list(splits["train"].indices) != list(range(10))  # drawn at random (see below), not the first
    assert splits["train"].indices == _datasets(parse_args(["--image-size", "32", "--limit", "10"]))[0]["train"].indices
    assert "note" not in capsys.readouterr().err
    splits, _ = _datasets(parse_args(["--image-size", "32", "--limit", "100000"]))  # more than there is: said
    train = len(splits["train"])
    assert f"note: --limit 100000 is more than the {train} training images of synthetic; all of them are used" in \
        capsys.readouterr().err
    _datasets(parse_args(["--image-size", "32", "--limit", str(train)]))  # all of them, as asked: nothing to say
    assert "note" not in capsys.readouterr().err


def test_a_path_the_console_cannot_spell_is_printed_escaped_not_an_error(tmp_path, cp1252_stdout):
    """Windows writes cp1252 to a file or pipe: the summary of a finished run raised UnicodeEncodeError for a user
    folder named Łukasz, which main then reported as a usage error (exit 2)."""
    out = tmp_path / "Łukasz" / "run"
    printed = cp1252_stdout()
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    assert f"wrote {tmp_path}{os.sep}\\u0141ukasz{os.sep}run" in printed()


def test_train_writes_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    first = main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    said = capsys.readouterr()
    assert "it/s" not in said.err  # --no-progress: no bars
    assert "; test (2 images): " in said.out  # what the numbers rest on
    record = json.loads((out / "metrics.json").read_text())
    assert record["world_size"] == 1 and record["best_epoch"] == 1 and len(record["history"]) == 1
    assert record["images"] == {"train": 8, "val": 2, "test": 2}
    assert {"seg/dice", "cls/acc", "cls/auc"} <= set(record["metrics"]["test"])
    assert record["metrics"]["val"]["seg/dice"] == pytest.approx(first["history"][0]["val/seg/dice"])
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()

    second = main([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]  # epoch 1 came from last.pt, not retrained
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    with pytest.warns(UserWarning, match="already has 2 epochs"):  # nothing to train: the run's record says so
        again = main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert again["epochs"] == 2 and json.loads((out / "metrics.json").read_text())["epochs"] == 2  # was 1


def test_data_root_holds_one_folder_per_dataset_as_in_the_notebooks(tmp_path, capsys):
    """--data-root ~/data, as a notebook's data_root: the dataset is looked for in ~/data/busi. (It was the
    dataset's own folder, so the notebooks' value failed here and the fetch advice pointed at ~/data.)"""
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--dataset", "busi", "--data-root", str(data), "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2
    assert f'busi is not downloaded: {data / "busi"} does not exist' in capsys.readouterr().err
    (data / "busi" / "benign").mkdir(parents=True)  # the old meaning: the dataset's own folder
    with pytest.raises(SystemExit):
        main([*SMOKE, "--dataset", "busi", "--data-root", str(data / "busi"), "--out-dir", str(tmp_path / "a")])
    assert (f"--data-root {data / 'busi'} looks like the 'busi' folder itself; --data-root is the folder that holds "
            f'one folder per dataset: pass --data-root "{data}"') in capsys.readouterr().err
    with pytest.raises(SystemExit):  # deeper inside it: the folder above the dataset's, in the option's own words
        main([*SMOKE, "--dataset", "busi", "--data-root", str(data / "busi" / "benign"), "--out-dir", str(tmp_path)])
    assert f'If that folder is the dataset, pass --data-root "{data}"' in capsys.readouterr().err


def test_errors_found_while_running_are_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a real dataset that was never fetched
        main([*SMOKE, "--dataset", "busi", "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2 and "python -m data_fetch busi" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # a refused run leaves nothing behind (its options.json was written)
    out = tmp_path / "run"
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    with pytest.raises(SystemExit):  # the same command again would overwrite the run
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert "already holds a run (last.pt, epoch 1 of 1): for a new run choose another out_dir" in err
    with pytest.raises(SystemExit) as exit_:  # refused too, before its options could replace the run's own
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--seed", "5", "--out-dir", str(out)])
    assert exit_.value.code == 2 and "already holds a run" in capsys.readouterr().err  # refused for that reason
    assert json.loads((out / "options.json").read_text())["seed"] == 0
    with pytest.raises(SystemExit):  # resuming a tiny run with another preset
        main([*SMOKE, "--preset", "course", "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert (f"cannot resume from {out / 'options.json'} with other options (--preset: 'tiny' then, 'course' now)"
            in capsys.readouterr().err)
    # other data: the tiny model's weights fit any image size, and another seed draws other synthetic
    # images; this resumed without a word
    with pytest.raises(SystemExit):
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--image-size", "64", "--seed", "5", "--out-dir", str(out),
              "--resume"])
    assert ("(--image-size: 32 then, 64 now; --seed: 0 then, 5 now). Resume with the options of that run, or start "
            "a new run in another out_dir") in capsys.readouterr().err
    (out / "options.json").unlink()  # a run from before options.json: the weights still have to fit
    with pytest.raises(SystemExit):
        main([*SMOKE, "--preset", "course", "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert "its weights do not fit this model" in capsys.readouterr().err
    history = main([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])["history"]
    assert [r["epoch"] for r in history] == [1, 2]  # the same options resume


def test_a_full_disk_ends_the_run_with_a_message_and_the_way_on(tmp_path, capsys, full_disk):
    """A full disk (or no permission) while writing a checkpoint or metrics.json ended in a traceback."""
    out = tmp_path / "run"
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    capsys.readouterr()
    full_disk()  # epoch 2's last.pt finds the disk full
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (f"python -m mtlearn.train: error: cannot write {out / 'last.pt'}: the disk is "
                                       f"full ({os.strerror(errno.ENOSPC)}); free some space, or write to a folder on "
                                       f"another disk (the previous file, if any, is kept). {out / 'last.pt'} holds "
                                       "epoch 1 of 2: run the same command with --resume to continue from there\n")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_path_refused_says_to_choose_another_not_to_run_again(tmp_path, capsys, monkeypatch, code):
    """--out-dir /sys/x: "[Errno 1] Operation not permitted ... run the command again to start over", which
    would be refused again the same way."""
    from mtlearn import train

    def refused(args):
        raise OSError(code, os.strerror(code), str(tmp_path / "run"))

    monkeypatch.setattr(train, "run", refused)
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--out-dir", str(tmp_path / "run")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"[Errno {code}] {os.strerror(code)}: '{tmp_path / 'run'}'. No epoch had finished" in err
    assert "choose an --out-dir (or --data-root) you may write to" in err and "run the command again" not in err


def test_a_full_disk_before_the_first_epoch_says_to_run_again_not_to_change_permissions(tmp_path, capsys,
                                                                                        monkeypatch):
    from mtlearn import train

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "last.pt"))

    monkeypatch.setattr(train, "run", full)
    with pytest.raises(SystemExit):
        main([*SMOKE, "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "run the command again to start over" in err and "permissions" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGTERM to send to a process on Windows")
def test_sigterm_says_what_was_kept_and_how_to_go_on_and_leaves_nothing_behind(tmp_path):
    """SIGTERM (a scheduler pre-empting the job, a Colab runtime stopped) ended training without a word, where Ctrl-C
    says which epoch is kept and how to resume; its lock and any half-written file were left too."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "mtlearn.train", *SMOKE, "--epochs", "200", "--limit", "8", "--out-dir", str(out)]
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and training.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=60)
    assert training.returncode == 128 + signal.SIGTERM, err
    assert re.fullmatch(rf"python -m mtlearn\.train: terminated \(SIGTERM\)\. {re.escape(str(out / 'last.pt'))} holds "
                        r"epoch \d+ of 200: run the same command with --resume to continue from there\n", err), err
    # no lock, no temporary file (best.pt may be missing: stopped between last.pt and it)
    assert {p.name for p in out.iterdir()} - {"best.pt"} == {"last.pt", "options.json"}


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a traceback from inside backward() and nothing about --resume."""
    from mtlearn import train

    out = tmp_path / "run"
    real_fit = train.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def status(argv):
        monkeypatch.setattr(train, "fit", interrupted)
        try:
            main(argv)
        except KeyboardInterrupt:  # caught here, or it would stop the whole test session
            pytest.fail("Ctrl-C left main() as a KeyboardInterrupt, i.e. a traceback")
        except SystemExit as exit_:
            return exit_.code
        finally:
            monkeypatch.setattr(train, "fit", real_fit)

    assert status([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out)]) == 130  # in epoch 1
    assert capsys.readouterr().err == (f"python -m mtlearn.train: interrupted. No epoch had finished, so nothing was "
                                       f"saved in {out}: run the command again to start over\n")
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])  # as the message says
    assert status([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"]) == 130  # in epoch 2
    assert (f"interrupted. {out / 'last.pt'} holds epoch 1 of 2: run the same command with --resume to continue"
            in capsys.readouterr().err)
    (out / "last.pt").write_bytes(b"damaged")  # what the message reads must not raise a traceback itself
    assert status([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"]) == 130
    assert (f"interrupted. {out / 'last.pt'} cannot be read, so there is nothing to resume: move it aside"
            in capsys.readouterr().err)
    # under torchrun every process gets the Ctrl-C; run() has taken the process group down by then, so
    # each would count as the main one: torchrun's RANK says which prints
    monkeypatch.setenv("RANK", "1")
    assert status([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"]) == 130
    assert capsys.readouterr().err == ""


def test_an_out_dir_no_one_may_write_to_is_one_line_before_training(tmp_path, capsys, unwritable):
    unwritable(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"python -m mtlearn.train: error: --out-dir {tmp_path / 'a'} is not writable "
                                       f"({tmp_path}, the folder it would be made in): no permission to create files "
                                       "there, or a read-only disk. Choose another --out-dir, one you can write to (it "
                                       "receives options.json, last.pt, best.pt and metrics.json)\n")


def test_a_second_run_into_an_out_dir_in_use_is_one_line_and_changes_nothing(tmp_path, capsys, held_by_another_run):
    """It trained beside the first, replaced its options.json, and the folder ended with a mix of both runs."""
    pid = held_by_another_run(tmp_path)
    write_json({"seed": 0}, tmp_path / "options.json")  # the first run's, written before its first last.pt
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--seed", "5", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m mtlearn.train: error: another run is writing to --out-dir {tmp_path} (process "
                          f"{pid} on ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "options.json"]
    assert json.loads((tmp_path / "options.json").read_text()) == {"seed": 0}


class _DamagedImages(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        from mtlearn.data.real import DamagedFileError
        raise DamagedFileError("busi/benign (11).png is not a readable image (cut short);\ndelete it and fetch again")


def test_a_dataset_error_in_a_loader_worker_is_its_own_message_too(tmp_path, capsys, monkeypatch):
    """--num-workers 2: the error came with torch's "Caught DamagedFileError in DataLoader worker process 1." and
    the worker's traceback, its own message last."""
    from mtlearn import train
    from mtlearn.data.real import DamagedFileError

    with pytest.raises(DamagedFileError) as caught:
        next(iter(DataLoader(_DamagedImages(), num_workers=1)))
    assert str(caught.value).startswith("Caught DamagedFileError in DataLoader worker process 0")
    monkeypatch.setattr(train, "run", lambda args: (_ for _ in ()).throw(caught.value))
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--num-workers", "1", "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("python -m mtlearn.train: error: busi/benign (11).png is not a readable image "
                                       "(cut short);\ndelete it and fetch again\n")


class _BadLabels(Dataset):
    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 2

    def __getitem__(self, index):
        if self.kind == "empty":
            raise ValueError()
        if self.kind == "quoting":  # a message that quotes a traceback of its own
            raise ValueError("converter failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                             "ValueError: bad pixel spacing")
        if self.kind == "line":  # a message with a line that looks like the end of a traceback
            raise ValueError("could not parse labels.csv:\nValueError: invalid literal for int() with base 10: 'x'")
        try:
            int("x")
        except ValueError as error:
            raise ValueError("labels.csv row 3 is not a number") from error


@pytest.mark.parametrize("kind, message", [
    ("line", "could not parse labels.csv:\nValueError: invalid literal for int() with base 10: 'x'"),
    ("chained", "labels.csv row 3 is not a number"),  # the error's own, not its cause's with the traceback between
    ("quoting", "converter failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad "
                "pixel spacing"),
    # not torch's whole report in the command line's one-line error: where it was raised
    ("empty", re.compile(r'ValueError without a message, raised in a DataLoader worker \(File ".*test_train_cli\.py", '
                         r"line \d+, in __getitem__\)")),
])
def test_a_worker_error_is_told_by_its_whole_message_and_not_its_causes(kind, message):
    from mtlearn.train import _own_message

    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(_BadLabels(kind), num_workers=1)))
    told = _own_message(caught.value)
    assert message.fullmatch(told) if isinstance(message, re.Pattern) else told == message


def test_a_data_root_that_is_a_file_is_named_as_one(tmp_path, capsys):
    """It read "FILE/busi does not exist" with a data_fetch command into that path, which could not succeed."""
    (tmp_path / "data").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--dataset", "busi", "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2
    data = tmp_path / "data"
    assert f"--data-root {data} cannot be a folder: {data} is a file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_run_that_diverges_ends_with_a_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        # 1e4, not more: with the default weight decay (3e-5) lr x weight_decay must stay below 1, or fit refuses it
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--lr", "1e4", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "python -m mtlearn.train: training stopped: " in err
    assert "Traceback" not in err and "learning rate" in err


def test_a_run_without_one_finite_validation_epoch_fails_with_a_message(tmp_path, capsys, monkeypatch):
    """Finite training losses, NaN validation losses (lr 10 does this on the tiny preset): the run ended with
    exit status 0, NaN test metrics and no word of why."""
    import mtlearn.engine

    real_evaluate = mtlearn.engine._evaluate

    def nan_validation(*args, **kwargs):
        return {k: math.nan if k.endswith("loss") else v for k, v in real_evaluate(*args, **kwargs).items()}

    monkeypatch.setattr(mtlearn.engine, "_evaluate", nan_validation)  # fit's validation, not the test split's
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("always")
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--lr", "3e-3", "--out-dir", str(out)])
    said = [str(w.message) for w in caught if "validation loss is not finite" in str(w.message)]
    assert [re.match(r"epoch (\d): the validation loss is not finite \(val/cls/loss, .*val/seg/loss\)", text)[1]
            for text in said] == ["1", "2"]
    printed, err = capsys.readouterr()
    assert exit_.value.code == 1 and "training stopped: no epoch had a finite validation loss" in err
    assert "best epoch" not in printed  # "best epoch None ...; wrote <out>" read like a finished run
    assert "lower --lr (now 0.003)" in err and "Traceback" not in err and str(out / "metrics.json") in err
    record = json.loads((out / "metrics.json").read_text())
    assert record["best_epoch"] is None and record["epochs"] == 2  # written, for a look at what went wrong
    last = record["history"][-1]  # no best epoch: the validation numbers are the last epoch's, as the test's
    assert record["metrics"]["val"] == {k.removeprefix("val/"): v for k, v in last.items() if k.startswith("val/")}
    assert record["history"][0]["val/seg/dice"] != last["val/seg/dice"]  # (so epoch 1's would not pass)


def test_a_metric_undefined_on_the_validation_split_is_told_apart_from_a_diverged_run(tmp_path, capsys):
    """--limit 4 validates on one image, one class: its AUC is NaN every epoch on finite losses. The message
    said "the run diverged; lower --lr", which changed nothing, and the fit warning's advice (monitor=...)
    had no command-line option."""
    argv = [*SMOKE, "--tasks", "cls", "--epochs", "1", "--limit", "4"]
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore")  # fit's own warning says the same in its API's words
        main([*argv, "--out-dir", str(tmp_path / "auc")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "training stopped: cls/auc was not finite in any epoch whose validation" in err
    assert "lower --lr" not in err and f"the last epoch's (in {tmp_path / 'auc' / 'metrics.json'})" in err
    assert "(a larger --limit, now 4) or choose another metric (e.g. --monitor cls/loss)" in err
    record = main([*argv, "--monitor", "cls/loss", "--out-dir", str(tmp_path / "loss")])  # the advice, followed
    assert (record["monitor"], record["best_epoch"]) == ("val/cls/loss", 1)
    assert load_checkpoint(tmp_path / "loss" / "last.pt")["config"]["monitor"] == "cls/loss"
    assert parse_args(["--monitor", "val/cls/loss"]).monitor == "cls/loss"  # fit's own spelling, taken too
    assert parse_args(["--tasks", "cls", "recon"]).monitor == "cls/auc"  # auto, as fit resolves it


def test_an_undefined_metric_is_named_even_when_some_epochs_also_diverged():
    """One epoch with a NaN validation loss, the others with finite losses and a NaN AUC: the AUC is why no
    epoch could be the best, and no lower --lr would give it a value."""
    from mtlearn.engine import History
    from mtlearn.train import _no_good_epoch

    history = History(monitor="val/cls/auc")
    for epoch, loss in enumerate([math.nan, 0.7, 0.6], start=1):
        history.append({"epoch": epoch, "val/cls/loss": loss, "val/cls/auc": math.nan})
    args = parse_args(["--tasks", "cls", "--out-dir", "runs/x"])
    said = _no_good_epoch(history, args)
    assert said.startswith("cls/auc was not finite in any epoch whose validation loss was") and "lower --lr" not in said
    assert "an AUC, a sensitivity or a specificity is undefined" in said and "balanced accuracy" not in said
    assert "(another dataset) or choose another metric (e.g. --monitor cls/loss)" in said  # no --limit given
    diverged = History(monitor="val/cls/auc")
    diverged.append({"epoch": 1, "val/cls/loss": math.nan, "val/cls/auc": 0.5})
    assert _no_good_epoch(diverged, args).endswith("the run diverged; lower --lr (now 0.0001)")


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_torchrun_two_processes_stay_in_sync(weighting, tmp_path, capsys):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mtlearn.train", *SMOKE, "--epochs", "2", "--limit", "32", "--weighting", weighting,
               "--out-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["world_size"] == 2
    digests, weights = record["parameter_digests"], record["task_weights_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks (PCGrad: its surgery)
    assert len(weights) == 2
    if weighting == "uncertainty":  # learned task weights, identical on both ranks (PCGrad's are constant 1)
        assert weights[0] == weights[1] and weights[0] != {"weight/seg": 1.0, "weight/cls": 1.0}
    # metrics summed over the two ranks equal one process evaluating the whole test subset
    model = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    load_checkpoint(out / "best.pt", model)
    test = random_subset(load_dataset("synthetic", split="test", image_size=32, seed=0), 32 // 4, seed=0)  # --limit's
    expected = evaluate(model, DataLoader(test, batch_size=4), device="cpu")
    for key, value in expected.items():
        assert record["metrics"]["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if weighting == "uncertainty":  # resumed by one process: other batches (of 4, not 2 x 4), so refused
        with pytest.raises(SystemExit):
            main([*SMOKE, "--epochs", "3", "--limit", "32", "--weighting", weighting, "--out-dir", str(out),
                  "--resume"])
        assert "processes: 2 then, 1 now" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- mutation audit
# Tests that pin down what surviving mutants of train.py changed unnoticed.


def test_the_starting_weights_follow_the_seed(tmp_path, monkeypatch):
    """fit seeds its own random streams only after the model exists: the weights come from --seed here."""
    import mtlearn.train

    class Built(Exception):
        pass

    digests = []

    def stop_before_training(model, *args, **kwargs):
        digests.append(mtlearn.train.state_digest(model))
        raise Built

    monkeypatch.setattr(mtlearn.train, "fit", stop_before_training)
    for run, seed in enumerate((0, 3, 3)):
        with pytest.raises(Built):
            mtlearn.train.run(parse_args([*SMOKE, "--limit", "8", "--seed", str(seed),
                                          "--out-dir", str(tmp_path / f"run{run}")]))
    assert digests[0] != digests[1] == digests[2]


def test_compile_reaches_the_run(tmp_path, capsys):
    """Read back through the one combination fit refuses (no compiling needed to see that it was asked for)."""
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--compile", "--weighting", "gradnorm",
              "--out-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "cannot train with compile=True" in capsys.readouterr().err


def test_a_model_the_compiler_cannot_build_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # torch's error printed dynamo's whole traceback above the advice to drop --compile
    from mtlearn.engine import CompileError

    def cannot_build(*args, **kwargs):
        raise CompileError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr("mtlearn.train.fit", cannot_build)
    with pytest.raises(SystemExit) as exit_:
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--compile", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "error: torch.compile could not build the model (InvalidCxxCompiler" in err and "without --compile" in err


def test_the_recorded_task_weights_are_the_last_epochs(tmp_path):
    record = main([*SMOKE, "--epochs", "2", "--limit", "8", "--weighting", "uncertainty", "--lr", "0.05",
                   "--out-dir", str(tmp_path / "run")])
    first, last = ({k: v for k, v in r.items() if k.startswith("weight/")} for r in record["history"])
    assert record["task_weights_per_process"] == [last] and first != last


def test_every_training_flag_reaches_the_run(tmp_path):
    """Options parsed but not passed on would be silently ignored: each is read back from the run itself."""
    out = tmp_path / "run"
    record = main([*SMOKE, "--device", "cpu", "--epochs", "1", "--limit", "8", "--lr", "3e-3", "--task-weights",
                   "seg=1", "cls=0.5", "--amp", "bf16", "--channels-last", "--seed", "3", "--out-dir", str(out)])
    config = load_checkpoint(out / "last.pt")["config"]
    assert (config["lr"], config["weighting"], config["task_weights"]) == (3e-3, "fixed", {"seg": 1.0, "cls": 0.5})
    assert (config["amp"], config["channels_last"], config["seed"], config["epochs"]) == ("bf16", True, 3, 1)
    first = record["history"][0]
    assert first["lr"] == pytest.approx(3e-3) and (first["weight/seg"], first["weight/cls"]) == (1.0, 0.5)
    other = main([*SMOKE, "--epochs", "1", "--limit", "8", "--weighting", "uncertainty", "--tasks", "cls", "recon",
                  "--no-channels-last", "--out-dir", str(tmp_path / "other")])
    config = load_checkpoint(tmp_path / "other" / "last.pt")["config"]
    assert (config["weighting"], config["tasks"], config["channels_last"]) == ("uncertainty", ["cls", "recon"], False)
    assert set(other["metrics"]["test"]) >= {"cls/acc", "recon/psnr"} and "seg/dice" not in other["metrics"]["test"]


def test_metrics_are_those_of_the_best_validation_epoch(tmp_path, monkeypatch):
    """Validation peaks at epoch 1 of 2 (forced): metrics.json then holds epoch 1's validation metrics, and
    the test metrics of best.pt's weights on the test split, and best.pt was chosen on the validation split."""
    from mtlearn.engine import History

    append = History.append

    def only_the_first_epoch_improves(self, record):
        best = (self.best_epoch, self.best_value)
        improved = append(self, record)
        if record["epoch"] > 1:
            self.best_epoch, self.best_value = best
            return False
        return improved

    monkeypatch.setattr(History, "append", only_the_first_epoch_improves)
    out = tmp_path / "run"
    record = main([*SMOKE, "--device", "cpu", "--epochs", "2", "--limit", "8", "--seed", "3", "--out-dir", str(out)])
    assert record["best_epoch"] == 1 and load_checkpoint(out / "best.pt")["epoch"] == 1
    assert record["metrics"]["val"] == {k.removeprefix("val/"): v for k, v in record["history"][0].items()
                                        if k.startswith("val/")}
    model = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    load_checkpoint(out / "best.pt", model)
    for split in ("val", "test"):  # --limit 8: 8 // 4 = 2 images of each split, drawn and seeded with --seed
        data = random_subset(load_dataset("synthetic", split=split, image_size=32, seed=3), 2, seed=3)
        expected = evaluate(model, DataLoader(data, batch_size=4), device="cpu")
        measured = record["metrics"][split]
        for key, value in expected.items():
            # two images may hold no malignant one: its sensitivity is then NaN, on both sides
            nan_ok = key in ("cls/sensitivity", "cls/specificity")
            assert measured[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=nan_ok), (split, key)


def test_training_order_follows_the_seed_and_evaluation_keeps_every_image_in_order():
    import torch

    from mtlearn.train import make_loader

    data = list(range(10))

    def order(seed):
        return [batch.tolist() for batch in make_loader(data, 4, True, seed, 0, torch.device("cpu"))]

    assert order(3) == order(3) != order(4)
    assert all(len(batch) == 4 for batch in order(3)) and len(order(3)) == 2  # no short batch for BatchNorm
    evaluation = make_loader(data, 4, False, 3, 0, torch.device("cpu"))
    assert [batch.tolist() for batch in evaluation] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # a training set of one batch or less keeps it (dropping the short batch would leave none)
    assert [len(batch) for batch in make_loader(data[:4], 4, True, 3, 0, torch.device("cpu"))] == [4]
    assert [len(batch) for batch in make_loader(data[:3], 4, True, 3, 0, torch.device("cpu"))] == [3]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_with_loader_workers_matches_an_uninterrupted_one(num_workers, tmp_path):
    """Workers draw the augmentation from generators seeded by the loader: a resumed run must seed them
    as the uninterrupted run did (persistent workers kept epoch 1's, which no checkpoint holds).
    Constant lr (poly_power 0), so that "2 epochs, then resume to 3" is the same schedule as 3 epochs."""
    import torch

    from mtlearn.engine import fit
    from mtlearn.train import make_loader, state_digest
    from tests.test_engine import ToyData, ToyNet

    def run(out_dir, epochs, resume=False):
        torch.manual_seed(0)
        model = ToyNet()
        loader = make_loader(ToyData(n=16), 4, train=True, seed=0, num_workers=num_workers, device=torch.device("cpu"))
        fit(model, loader, None, epochs=epochs, lr=1e-2, poly_power=0, device="cpu", seed=0, progress=False,
            out_dir=out_dir, resume=resume)
        return state_digest(model)

    uninterrupted = run(tmp_path / "full", 3)
    run(tmp_path / "resumed", 2)
    assert run(tmp_path / "resumed", 3, resume=True) == uninterrupted


def test_under_torchrun_drop_last_looks_at_this_process_share(monkeypatch):
    """12 images on 2 processes, batch 8: each process holds 6, one batch each (not none, which would stop
    fit with 'no batches' although the whole dataset is larger than a batch)."""
    import torch
    from torch.utils.data import DistributedSampler, TensorDataset

    import mtlearn.train as train

    monkeypatch.setattr(train, "is_distributed", lambda: True)
    monkeypatch.setattr(train, "DistributedSampler", lambda dataset, **kw: DistributedSampler(
        dataset, num_replicas=2, rank=0, **kw))
    loader = train.make_loader(TensorDataset(torch.zeros(12, 1)), 8, train=True, seed=0, num_workers=0,
                               device=torch.device("cpu"))
    assert len(loader) == 1 and len(next(iter(loader))[0]) == 6

    def order(seed):  # --seed orders the data under torchrun too (the sampler's own seed, not the loader's)
        numbered = TensorDataset(torch.arange(12.0)[:, None])
        loader = train.make_loader(numbered, 6, train=True, seed=seed, num_workers=0, device=torch.device("cpu"))
        return next(iter(loader))[0].flatten().tolist()

    assert order(3) == order(3) != order(4)


class _Exited(Exception):
    """Stands in for os._exit, which would end the test process."""


@pytest.mark.parametrize("outcome, status, printed", [
    (None, 0, ""),
    (SystemExit(2), 2, ""),  # main's "error:" exit and argparse's
    (SystemExit(None), 0, ""),
    (SystemExit("stopped early"), 1, "stopped early"),
    (RuntimeError("disk full"), 1, "RuntimeError: disk full"),  # with its traceback, as Python prints it
])
def test_under_torchrun_the_command_line_exits_with_main_status_without_the_teardown(
        outcome, status, printed, monkeypatch, capsys):
    """`python -m mtlearn.train` under torchrun leaves through os._exit (see _command_line): the status and
    message must be main's, and the streams flushed, or torchrun would misreport how the run ended."""
    import mtlearn.train as train

    def fake_main():
        print("trained")
        if outcome is not None:
            raise outcome

    def fake_exit(code):
        raise _Exited(code)

    flushed = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setattr(train.os, "_exit", fake_exit)
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append("out"))
    monkeypatch.setattr(sys.stderr, "flush", lambda: flushed.append("err"))
    with pytest.raises(_Exited) as exited:
        train._command_line()
    assert exited.value.args == (status,)
    assert flushed == ["out", "err"]
    captured = capsys.readouterr()
    assert captured.out == "trained\n" and printed in captured.err
    assert ("Traceback" in captured.err) == isinstance(outcome, RuntimeError)


@pytest.mark.parametrize("world_size", [None, "1"])
def test_without_torchrun_the_command_line_exits_as_python_does(world_size, monkeypatch):
    """One process keeps Python's own exit (atexit handlers and all): errors propagate, os._exit is never called."""
    import mtlearn.train as train

    def fake_main():
        raise SystemExit(2)

    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setattr(train.os, "_exit", lambda code: pytest.fail("os._exit called on one process"))
    with pytest.raises(SystemExit) as exit_:
        train._command_line()
    assert exit_.value.code == 2


def test_under_torchrun_ctrl_c_is_not_turned_into_an_exit_status(monkeypatch):
    import mtlearn.train as train

    def fake_main():
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setattr(train.os, "_exit", lambda code: pytest.fail("os._exit called after Ctrl-C"))
    with pytest.raises(KeyboardInterrupt):
        train._command_line()


# ------------------------------------------------------------------------------------------ pinned by mutation


def test_only_the_training_split_is_augmented(tmp_path, monkeypatch):
    """--augment on every split would pick the best epoch and report the test metrics on flipped images."""
    import mtlearn.data
    from mtlearn import train

    calls = {}

    def record(name, split, augment=False, **kwargs):
        calls[split] = augment
        return load_dataset("synthetic", split=split, num_samples=8, image_size=32)

    monkeypatch.setattr(mtlearn.data, "load_dataset", record)
    train._datasets(parse_args([*SMOKE, "--dataset", "busi", "--data-root", str(tmp_path), "--augment"]))
    assert calls == {"train": True, "val": False, "test": False}


def test_a_resume_into_an_empty_folder_records_its_options(tmp_path, capsys):
    """--resume where nothing ran yet starts a run: its options.json must be written, or a later --resume
    with another seed would not be refused."""
    out = tmp_path / "run"
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert json.loads((out / "options.json").read_text())["seed"] == 0
    with pytest.raises(SystemExit):
        main([*SMOKE, "--epochs", "2", "--limit", "8", "--seed", "5", "--out-dir", str(out), "--resume"])
    assert "--seed: 0 then, 5 now" in capsys.readouterr().err


CHANGED_RUN_OPTIONS = [("--preset", ["--preset", "course"]), ("--dfe", ["--dfe", "three"]),
                       ("--dataset", ["--dataset", "bus_bra"]),
                       ("--image-size", ["--image-size", "64"]), ("--augment", ["--augment"]),
                       ("--limit", ["--limit", "8"]), ("--seed", ["--seed", "5"]),
                       ("--batch-size", ["--batch-size", "8"]),
                       # fit refused it too, but after the data loaded, advising its keyword monitor=
                       ("--monitor", ["--monitor", "seg/loss"])]


def test_every_run_option_has_a_resume_check_below():
    from mtlearn import train

    assert {f"--{name.replace('_', '-')}" for name in train.RUN_OPTIONS} == {flag for flag, _ in CHANGED_RUN_OPTIONS}


@pytest.mark.parametrize("flag, changed", CHANGED_RUN_OPTIONS, ids=[flag for flag, _ in CHANGED_RUN_OPTIONS])
def test_resume_refuses_a_change_of_any_run_option(tmp_path, flag, changed):
    from mtlearn import train

    out = tmp_path / "run"
    base = [*SMOKE, "--dataset", "busi", "--data-root", str(tmp_path), "--out-dir", str(out)]
    options = train._check_run_options(parse_args(base))  # a new run: the options its options.json records
    assert options["seed"] == 0 and not out.exists()  # written by run() once the data and the model are there
    write_json(options, out / "options.json")
    (out / "last.pt").write_bytes(b"")  # as if it had trained an epoch
    with pytest.raises(ValueError, match=f"cannot resume .*with other options \\({flag}: "):
        train._check_run_options(parse_args([*base, *changed, "--resume"]))
    assert train._check_run_options(parse_args([*base, "--resume"])) is None  # the same options resume
    # ... however the monitor is spelt (options.json holds the metric auto picks)
    assert train._check_run_options(parse_args([*base, "--resume", "--monitor", "val/seg/dice"])) is None


@pytest.mark.parametrize("dataset, limit, drawn, refused", [
    ("busi", None, None, True), ("synthetic", "8", None, True), ("synthetic", None, None, False),
    ("busi", None, 2, True), ("synthetic", "8", 2, False)])
def test_resume_refuses_a_run_whose_images_are_now_drawn_another_way(tmp_path, dataset, limit, drawn, refused):
    """A run started before the real datasets' splits and --limit's images were drawn anew would go on with other
    images, some of them its test images; the synthetic splits (fixed index ranges) did not change, and --limit's
    draw not since draw 2 (draw 3 changed how split_by_group deals a real dataset's groups)."""
    from mtlearn import train
    from mtlearn.data.splits import DRAW_VERSION

    out = tmp_path / "run"
    base = [*SMOKE, "--dataset", dataset, "--data-root", str(tmp_path), "--out-dir", str(out)]
    base += ["--limit", limit] if limit else []
    options = train._check_run_options(parse_args(base))
    assert options["data_draw"] == DRAW_VERSION == 3
    if drawn is None:
        del options["data_draw"]  # as an options.json of a run before draws were recorded reads
    else:
        options["data_draw"] = drawn
    write_json(options, out / "options.json")
    (out / "last.pt").write_bytes(b"")
    if refused:
        with pytest.raises(ValueError, match=r"cannot resume the run in .*drew a real dataset's splits and --limit's "
                                             rf"images another way \(data draw {drawn or 1} then, 3 now\)"):
            train._check_run_options(parse_args([*base, "--resume"]))
    else:
        assert train._check_run_options(parse_args([*base, "--resume"])) is None


def test_the_loaders_follow_seed_and_num_workers(tmp_path, monkeypatch):
    from mtlearn import train

    seen = {}

    def stop(model, train_loader, val_loader, config):
        seen.update(seed=train_loader.generator.initial_seed(), workers=train_loader.num_workers)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", stop)
    with pytest.raises(KeyboardInterrupt):
        train.run(parse_args([*SMOKE, "--limit", "8", "--seed", "3", "--num-workers", "1", "--device", "cpu",
                              "--out-dir", str(tmp_path / "run")]))
    assert seen == {"seed": 3, "workers": 1}
    assert parse_args(["--task-weights", "seg=0", "cls=1"]).task_weights == {"seg": 0.0, "cls": 1.0}  # 0 is a weight


def test_resume_refuses_another_copy_of_the_dataset_under_the_same_options(tmp_path, capsys):
    """--resume with --data-root naming another BUSI folder went on silently: epoch 1 trained on the one, epoch 2
    on the other, the test set was the other's, and best.pt was chosen across both."""
    from tests.fixtures_real import make_busi

    for name, seed in (("a", 0), ("b", 1)):  # the same file names, other pictures
        make_busi(tmp_path / name / "busi", per_class=12, seed=seed)
    out = tmp_path / "run"
    base = [*SMOKE, "--dataset", "busi", "--limit", "8", "--out-dir", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixture's quirks, said by the loader
        main([*base, "--data-root", str(tmp_path / "a"), "--epochs", "1"])
        recorded = json.loads((out / "options.json").read_text())["data_fingerprint"]
        assert isinstance(recorded, str) and len(recorded) == 16
        with pytest.raises(SystemExit) as stop:
            main([*base, "--data-root", str(tmp_path / "b"), "--epochs", "2", "--resume"])
        assert stop.value.code == 2
        assert "the busi images found now (--data-root " in capsys.readouterr().err
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 1  # the run is as it was
        main([*base, "--data-root", str(tmp_path / "a"), "--epochs", "2", "--resume"])  # its own data: goes on
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    # generated data has no files to fingerprint: its seed and options say what it is
    main([*SMOKE, "--limit", "8", "--epochs", "1", "--out-dir", str(tmp_path / "synthetic")])
    assert json.loads((tmp_path / "synthetic" / "options.json").read_text())["data_fingerprint"] is None


def test_the_data_fingerprint_tells_npz_datasets_apart_by_their_pixels(tmp_path):
    """An npz dataset's items are arrays of one size: file sizes alone gave two copies with other pictures (and
    the same ids and labels) one fingerprint."""
    from mtlearn.train import _datasets, data_fingerprint
    from tests.fixtures_real import make_busi_npz

    prints = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        make_busi_npz(tmp_path / name / "busi_npz", resolution=128, seed=seed)
        args = parse_args(["--dataset", "busi_npz", "--data-root", str(tmp_path / name), "--image-size", "32"])
        prints.append(data_fingerprint(_datasets(args)[0]))
    assert prints[0] != prints[1] and prints[0] == prints[2]  # other pixels; the same data in another folder


def test_the_data_fingerprint_reads_which_items_each_split_holds_and_what_they_are(tmp_path):
    """Each part of an item's facts tells two datasets apart: the items a Subset chose, a label (a corrected
    label file), an image file's or a mask file's size (re-annotated masks); generated data has none."""
    from torch.utils.data import Subset

    from mtlearn.data.real import Record
    from mtlearn.train import data_fingerprint

    for name, size in (("a.png", 10), ("a_mask.png", 20), ("b.png", 30), ("b_mask.png", 40)):
        (tmp_path / name).write_bytes(b"x" * size)

    class Listed:
        def __init__(self, records):
            self.records = records

    def dataset(label_a=0, mask_a="a_mask.png"):
        return Listed([Record("a", label_a, tmp_path / "a.png", (tmp_path / mask_a,), "a"),
                       Record("b", 1, tmp_path / "b.png", (tmp_path / "b_mask.png",), "b"),
                       Record("c", 1, np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8), "c")])

    def printed(data):
        return data_fingerprint({"train": data})

    reference = printed(dataset())
    assert printed(dataset()) == reference  # the same facts: the same print
    assert printed(Subset(dataset(), [0, 1])) != printed(Subset(dataset(), [1, 2]))  # which items were chosen
    assert printed(dataset(label_a=1)) != reference  # a label
    assert printed(dataset(mask_a="b_mask.png")) != reference  # a mask file of another size
    arrays = dataset()
    arrays.records[2] = Record("c", 1, np.full((4, 4), 7, np.uint8), np.ones((4, 4), np.uint8), "c")
    assert printed(arrays) != reference  # an npz item's pixels
    assert data_fingerprint({"train": dataset(), "test": [{"image": 0}]}) is None  # a generated split: none


def test_resume_of_a_run_recorded_before_fingerprints_goes_on(tmp_path, capsys):
    """A run whose options.json has no fingerprint (started before it was recorded) must still resume; and a new
    run into a folder that holds only options.json (the first died before last.pt) is no resume at all."""
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "a" / "busi", per_class=12, seed=0)
    make_busi(tmp_path / "b" / "busi", per_class=12, seed=1)
    out = tmp_path / "run"
    base = [*SMOKE, "--dataset", "busi", "--limit", "8", "--out-dir", str(out), "--data-root", str(tmp_path / "a")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixture's quirks, said by the loader
        main([*base, "--epochs", "1"])
        options = json.loads((out / "options.json").read_text())
        del options["data_fingerprint"]
        write_json(options, out / "options.json")
        main([*base, "--epochs", "2", "--resume"])
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
        fresh = tmp_path / "fresh"
        write_json({**options, "data_fingerprint": "0" * 16}, fresh / "options.json")  # no last.pt beside it
        main([*SMOKE, "--dataset", "busi", "--limit", "8", "--epochs", "1", "--out-dir", str(fresh),
              "--data-root", str(tmp_path / "b")])
    assert json.loads((fresh / "metrics.json").read_text())["epochs"] == 1
