import os

import torch

# The Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
# the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pendulum_run(tmp_path_factory):
    """A tiny trained Pendulum run (40-step episodes) for the commands that deploy a saved agent."""
    from agents.cli import main

    run = tmp_path_factory.mktemp("trained") / "pendulum"
    assert main(["train", "env=pendulum", "env.time_limit=40", "steps=300", f"run_dir={run}", "size=xs", "prefill=100",
                 "train_ratio=16", "batch_size=4", "seq_len=8", "log_every=50", "eval_episodes=1", "eval_every=0",
                 "progress=false", "collect_every=8"]) == 0
    return run
