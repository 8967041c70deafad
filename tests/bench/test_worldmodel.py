"""`longdream bench worldmodel`: the activation memory it reports, and a tiny run of it."""
import json

import torch

from agents.cli import main
from bench.worldmodel import saved_for_backward


def test_saved_for_backward_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)
    # exp saves its output (4,000 bytes); sum saves nothing; the product saves x and y, once each
    out, n = saved_for_backward(lambda: x.exp().sum())
    assert n == 4000 and out.requires_grad
    y = torch.randn(1000, requires_grad=True)
    _, n = saved_for_backward(lambda: ((x * y) + (x * y)).sum())
    assert n == 8000


def test_worldmodel_bench_rows_carry_activation_memory(tmp_path):
    assert main(["bench", "worldmodel", "backbones=rssm,mamba", "lengths=8,16", "tokens=32", "horizons=4", "starts=4",
                 "repeats=1", f"out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "worldmodel_cpu.json").read_text())["train"]
    assert [(r["backbone"], r["L"]) for r in rows] == [("rssm", 8), ("rssm", 16), ("mamba", 8), ("mamba", 16)]
    assert all(r["saved_mib"] > 0 for r in rows)
    assert "saved for backward MiB" in (tmp_path / "worldmodel_cpu.md").read_text()
