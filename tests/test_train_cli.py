import json
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader, Subset

from mtlearn.data import load_dataset
from mtlearn.engine import evaluate, load_checkpoint
from mtlearn.mtl import build_model
from mtlearn.train import main, parse_args

SMOKE = ["--preset", "tiny", "--image-size", "32", "--batch-size", "4", "--no-progress"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--tasks", "--weighting", "--resume", "--amp", "--out-dir", "torchrun"):
        assert option in text


def test_defaults_name_the_output_folder():
    args = parse_args(["--tasks", "seg", "cls", "recon", "--weighting", "pcgrad", "--seed", "3"])
    assert args.out_dir == "outputs/train/synthetic_64px_tiny_seg+cls+recon_pcgrad_s3"
    # the data's identity is in the name (another dataset or size is another run); the epochs are
    # not (--resume --epochs N continues the same run)
    other = parse_args(["--dataset", "busi", "--data-root", "data", "--image-size", "128", "--epochs", "9"])
    assert other.out_dir == "outputs/train/busi_128px_tiny_seg+cls_fixed_s0"
    assert parse_args(["--task-weights", "seg=1", "cls=0.5"]).task_weights == {"seg": 1.0, "cls": 0.5}


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--weighting", "magic"], "invalid choice: 'magic'"),
    (["--tasks", "depth"], "invalid choice: 'depth'"),
    (["--task-weights", "seg=high", "cls=1"], "TASK=NUMBER"),
    (["--task-weights", "seg=1"], "one weight per task"),
    (["--weighting", "dwa", "--task-weights", "seg=1", "cls=1"], "only applies to --weighting fixed"),
    (["--limit", "2"], "--limit must be >= 4"),
    (["--dataset", "nope"], "invalid choice: 'nope'"),
    (["--image-size", "60"], "--image-size must be a multiple of 16 (the network's stride), got 60; try 64"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--augment"], "--augment applies to real datasets"),
    (["--device", "cdua"], "unknown device 'cdua'"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_train_writes_metrics_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    record = json.loads((out / "metrics.json").read_text())
    assert record["world_size"] == 1 and record["best_epoch"] == 1 and len(record["history"]) == 1
    assert {"seg/dice", "cls/acc", "cls/auc"} <= set(record["metrics"]["test"])
    assert record["metrics"]["val"]["seg/dice"] == pytest.approx(first["history"][0]["val/seg/dice"])
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()

    second = main([*SMOKE, "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]  # epoch 1 came from last.pt, not retrained
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_errors_found_while_running_are_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a real dataset that was never fetched
        main([*SMOKE, "--dataset", "busi", "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "a")])
    assert exit_.value.code == 2 and "python -m data_fetch busi" in capsys.readouterr().err
    out = tmp_path / "run"
    main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    with pytest.raises(SystemExit):  # the same command again would overwrite the run
        main([*SMOKE, "--epochs", "1", "--limit", "8", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert "already holds a run (last.pt, epoch 1 of 1): for a new run choose another out_dir" in err
    with pytest.raises(SystemExit):  # resuming a tiny run with another preset
        main([*SMOKE, "--preset", "course", "--epochs", "2", "--limit", "8", "--out-dir", str(out), "--resume"])
    assert "its weights do not fit this model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_torchrun_two_processes_stay_in_sync(weighting, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mtlearn.train", *SMOKE, "--epochs", "2", "--limit", "32", "--weighting", weighting,
               "--out-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["world_size"] == 2
    digests, weights = record["parameter_digests"], record["task_weights_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    assert len(weights) == 2 and weights[0] == weights[1]  # and identical task weights
    if weighting == "uncertainty":
        assert weights[0] != {"weight/seg": 1.0, "weight/cls": 1.0}  # they were learned
    # metrics summed over the two ranks equal one process evaluating the whole test subset
    model = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    load_checkpoint(out / "best.pt", model)
    test = Subset(load_dataset("synthetic", split="test", image_size=32, seed=0), range(32 // 4))
    expected = evaluate(model, DataLoader(test, batch_size=4), device="cpu")
    for key, value in expected.items():
        assert record["metrics"]["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
