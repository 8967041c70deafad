"""Data-parallel learning (agents/distributed.py) and Ray collection (agents/collect.py), on one machine:
gloo ranks as separate processes launched the way torchrun launches them, and a local Ray instance."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args, timeout: float = 300) -> None:
    """Run dist_worker.py as `world` ranks (or alone for world 0) and wait for all of them."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if world == 0:
        envs = [base]
    else:
        port = str(free_port())
        envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port} for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=e, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for e in envs]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_collective_helpers(tmp_path):
    out = tmp_path / "ops.pt"
    launch(2, "ops", out)
    res = torch.load(out)
    assert torch.equal(res["a"], torch.full((3,), 1.5))  # mean of 1 and 2
    assert torch.equal(res["b"], torch.full((2,), 2.0))  # 4 on rank 0, none (zero) on rank 1
    assert res["c"] is None  # no rank had one
    assert res["gather"].tolist() == [0, 0, 1, 10]  # rank order
    assert res["all_true"] is False and res["all_true_all"] is True
    assert res["flags"] == [True, False]  # rank 0's


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Three updates on 2 gloo ranks, half of a fixed batch each, give the weights one process gets from
    the whole batch: gradients averaged, return percentiles over both ranks' returns."""
    launch(0, "update", tmp_path / "one.pt", 3)
    launch(2, "update", tmp_path / "two.pt", 3)
    one, two = torch.load(tmp_path / "one.pt")["state"], torch.load(tmp_path / "two.pt")["state"]
    moved = 0
    for k, v in one.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)
            moved += 1
    assert moved > 50
    for k in ("retnorm.low", "retnorm.high"):  # percentiles of tiny returns: compare them relative to their size
        assert one[k] != 0
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=0, msg=k)


@pytest.mark.slow
def test_torchrun_trains_and_resumes(tmp_path):
    """`longdream train` under torchrun with 2 gloo ranks: rank 0 writes TensorBoard and the checkpoint
    in run_dir, rank 1 its replay shard under run_dir/ranks/1, env steps count both ranks, and the run
    resumes from both ranks' checkpoints."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
           "-m", "agents.cli", "train", "preset=quickstart", "env=cartpole", "prefill=200", "batch_size=4",
           "seq_len=8", "eval_episodes=1", "progress=false", f"run_dir={run}", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["steps=400"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("trained 4") == 1  # rank 0 reports, once: 400 env steps (and a few of the last batch)
    assert (run / "tb").exists() and not (run / "ranks" / "1" / "tb").exists()
    assert (run / "checkpoints" / "latest").exists() and (run / "ranks" / "1" / "checkpoints" / "latest").exists()
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert step == int((run / "ranks" / "1" / "checkpoints" / "latest").read_text().split("-")[1]) >= 400
    r = subprocess.run(cmd + ["steps=700"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"at env step {step:,}" in r.stdout + r.stderr


@pytest.mark.slow
def test_ray_collection_with_two_local_workers():
    """Two Ray actors, one env each: batches arrive stacked per env, each stream's episodes are kept
    apart (a reset row starts from a zero state), and pushed weights reach the workers."""
    ray = pytest.importorskip("ray")
    import functools

    from agents.collect import CollectorError, RayCollection
    from agents.config import load_config
    from agents.train import _collect_env, build_agent

    torch.manual_seed(0)
    cfg, _ = load_config(["preset=quickstart", "env=cartpole"])
    agent, policy, shapes = build_agent(cfg, "cpu")
    fns = [functools.partial(_collect_env, cfg.env, s, shapes) for s in (0, 1000)]
    col = RayCollection(fns, policy, 50, {"cpus_per_worker": 1, "start_timeout": 300})
    try:
        batches = []
        for i, data in enumerate(col):
            batches.append(data)
            if i == 2:
                with torch.no_grad():
                    for p in policy.parameters():
                        p.zero_()
                col.update_policy_weights_()
            if i == 5:
                break
        ray.kill(col.remote_collectors[1])  # a worker dies: the next batch is an error, not a hang or stale data
        with pytest.raises(CollectorError, match="worker failed"):
            next(iter(col))
    finally:
        col.shutdown()
    data = torch.cat(batches[:3], 1)  # (2, 150): the steps before the weights changed
    assert data.batch_size == torch.Size([2, 150])
    assert not torch.equal(data["observation"][0], data["observation"][1])  # two streams, two seeds
    for e in range(2):
        steps, init = data["next", "step_count"][e].flatten(), data["is_init"][e].flatten()
        done = data["next", "done"][e].flatten()
        assert done.any()
        for t in range(1, 150):  # an episode continues until done; the row after a done starts a new one
            assert bool(init[t]) == bool(done[t - 1])
            assert steps[t] == (1 if done[t - 1] else steps[t - 1] + 1)
        for k in ("state_deter", "prev_action"):  # the carried state is zero at every episode start
            assert data[k][e][init].abs().sum() == 0
        assert data["state_deter"][e][~init].abs().sum() > 0
    # zero weights: the recurrent state of the last batch, collected after the push, stays zero
    assert batches[5]["next", "state_deter"].abs().sum() == 0


@pytest.mark.slow
def test_train_joins_a_running_ray_cluster(tmp_path):
    """`ray.address=` joins a cluster started with `ray start --head` and token authentication (as on a
    real cluster), trains through it and leaves it running; without the token the run stops with the
    one-line error that says what to set."""
    pytest.importorskip("ray")
    import secrets

    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    start = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        address = f"127.0.0.1:{port}"
        run = tmp_path / "run"
        cmd = [sys.executable, "-m", "agents.cli", "train", "preset=quickstart", "env=cartpole", "prefill=200",
               "batch_size=4", "seq_len=8", "eval_episodes=1", "progress=false", f"run_dir={run}", "threads=1",
               "steps=300", "collector=ray", "envs=2", f"ray.address={address}"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "trained 3" in r.stdout and (run / "checkpoints" / "latest").exists()
        r = subprocess.run([ray_cli, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "2.0 CPU" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]  # still up
        no_token = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}
        denied = [a.replace(str(run), str(tmp_path / "denied")) for a in cmd]
        r = subprocess.run(denied, cwd=ROOT, env=no_token, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "cannot join the Ray cluster" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=300)

def test_collector_settings_are_checked(capsys):
    from agents.cli import main

    assert main(["train", "collector=spark"]) == 2
    assert "collector must be local or ray" in capsys.readouterr().err
    assert main(["train", "ray.workers=3"]) == 2
    assert "unknown config key 'ray.workers'" in capsys.readouterr().err
