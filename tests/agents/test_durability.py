"""A run directory survives kills, refuses a second process and reports disk trouble in one line."""
import errno
import subprocess
import sys
import textwrap

import pytest
import torch

from agents import checkpoint
from agents.cli import main
from agents.replay import Replay
from agents.runlock import RunLock

FAST = ["env=pendulum", "env.time_limit=50", "size=xs", "prefill=100", "train_ratio=16", "batch_size=4", "seq_len=8",
        "log_every=50", "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8"]


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longdream: error:") and "\n" not in err, err
    return err


def counters(run):
    ckpt = checkpoint.latest(run)
    return ckpt, torch.load(ckpt / "agent.pt", weights_only=False)["counters"]


def test_second_process_is_refused(tmp_path, capsys):
    import os

    run = tmp_path / "busy"
    with RunLock(run):
        err = one_line_error(capsys, ["train", f"run_dir={run}", "steps=100", *FAST])
    assert f"in use by process {os.getpid()}" in err and "lock" in err


@pytest.mark.slow
def test_stale_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "stale"
    run.mkdir()
    (run / "lock").write_text("999999\n")  # a killed process's PID; nobody holds the lock
    assert main(["train", f"run_dir={run}", "steps=120", *FAST]) == 0
    assert "took over the lock of process 999999" in capsys.readouterr().out
    assert (run / "lock").read_text() == ""  # released on exit


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = one_line_error(capsys, ["train", f"run_dir={blocker}/run", "steps=100", *FAST])
    assert "cannot write to run_dir" in err


@pytest.mark.slow
def test_full_disk_at_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    run = tmp_path / "full"
    assert main(["train", f"run_dir={run}", "steps=120", *FAST]) == 0
    good, saved = counters(run)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    err = one_line_error(capsys, ["train", f"run_dir={run}", "steps=200"])
    assert "no space left" in err
    monkeypatch.undo()
    assert checkpoint.latest(run) == good and not list((run / "checkpoints").glob(".*.tmp"))
    assert main(["train", f"run_dir={run}", "steps=200"]) == 0  # resumes from the good one
    assert f"at env step {saved['env_steps']:,}" in capsys.readouterr().out


KILL_IN_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from agents import replay
    original, calls = replay.Replay.save, [0]

    def save(self, path):  # die halfway through the 16th checkpoint (after updates began): agent.pt written, replay record not
        calls[0] += 1
        if calls[0] == 16:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, path)

    replay.Replay.save = save
    from agents.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_during_checkpoint_write(tmp_path, capsys):
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, "train", f"run_dir={run}", "steps=100000",
                           "checkpoint_every=0", *FAST], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    assert list((run / "checkpoints").glob(".ckpt-*.tmp")), "the kill should land inside a checkpoint write"
    ckpt, saved = counters(run)
    meta = Replay.read_meta(ckpt)
    assert main(["train", f"run_dir={run}", f"steps={saved['env_steps'] + 32}"]) == 0
    out = capsys.readouterr().out
    assert f"from {ckpt.name} at env step {saved['env_steps']:,}: {meta['hi'][0]:,} replay rows" in out
    assert not list((run / "checkpoints").glob(".ckpt-*.tmp"))
    final_ckpt, final = counters(run)
    assert final["env_steps"] >= saved["env_steps"] + 32 and final["updates"] > saved["updates"]
    rp = Replay.open(run / "replay", final_ckpt)
    assert rp.lo == meta["lo"] and rp.hi[0] > meta["hi"][0] and rp.verify() == []
