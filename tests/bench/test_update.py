"""`longdream bench update`: its RSSM-only presets are refused for other backbones, not mislabelled."""
import json

import pytest
import torch

from agents.cli import main


def test_rssm_presets_are_refused_for_other_backbones(capsys):
    assert main(["bench", "update", "backbone=s5wm", "sizes=xs,p064"]) == 2
    err = capsys.readouterr().err.strip()
    assert "p064" in err and "sizes=xs,s" in err and "\n" not in err


def test_update_row_for_a_state_space_backbone(tmp_path):
    assert main(["bench", "update", "backbone=s5wm", "sizes=xs", "repeats=1", "warmup=0", "batch=2", "seq=8",
                 f"out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "update_cpu.json").read_text())["longdream"]
    assert [r["size"] for r in rows] == ["xs"]
    assert rows[0]["dims"]["d_state"] == 32 and rows[0]["params"] > 0  # the S5WM's own xs dims, recorded


def test_update_rows_for_every_backbone(tmp_path):
    """backbone=all: one row per backbone in one run, each with its own dims, and the time against the RSSM's."""
    from worldmodels.model import BACKBONES

    assert main(["bench", "update", "backbone=all", "sizes=xs", "repeats=1", "warmup=0", "batch=2", "seq=8",
                 f"out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "update_cpu.json").read_text())["longdream"]
    assert [r["backbone"] for r in rows] == list(BACKBONES)
    assert len({json.dumps(r["dims"], sort_keys=True) for r in rows}) == len(rows)
    table = (tmp_path / "update_cpu.md").read_text()
    assert table.count("the RSSM's time") == len(BACKBONES) - 1


def test_interleaved_rows_give_round_by_round_ratios(tmp_path, monkeypatch):
    """interleave=true: the cases are timed in turn, one update each per round, and each non-RSSM row gets
    the median and range of its time over the RSSM's in the same round; its own results file."""
    import bench.update as bu

    order = []
    real_prepare = bu.prepare

    def prepare(size, a, backbone=None, compiled=False, graph=False, deter=None):
        step, row = real_prepare(size, a, backbone, compiled, graph, deter)

        def timed():  # by round: the RSSM 2, 10, 4 ms, the S5WM 3, 12, 4.4 (ratios 1.5, 1.2, 1.1)
            step()
            order.append(backbone)
            return {"rssm": [2.0, 10.0, 4.0], "s5wm": [3.0, 12.0, 4.4]}[backbone][order.count(backbone) - 1]
        timed.check = step.check
        return timed, row

    monkeypatch.setattr(bu, "prepare", prepare)
    assert main(["bench", "update", "backbone=s5wm,rssm", "sizes=xs", "interleave=true", "repeats=3", "warmup=0",
                 "batch=2", "seq=8", f"out={tmp_path}"]) == 0
    assert order == ["s5wm", "rssm"] * 3
    rows = json.loads((tmp_path / "update_cpu_interleaved.json").read_text())["longdream"]
    s5, rssm = rows
    assert "rssm_ratio" not in rssm and s5["rssm_ratio"] == {"median": 1.2, "min": 1.1, "max": 1.5}  # not 4.4 / 4
    assert "1.20x the RSSM's time (round by round, 1.10-1.50)" in (tmp_path / "update_cpu_interleaved.md").read_text()


@pytest.mark.slow  # compiles Mamba's imagination step
def test_compiled_step_rows_beside_the_eager_ones(tmp_path):
    """compile_step=true: Mamba is timed eager and with its compiled step in the same run (the second row
    says by how much), a backbone without a compilable step once; its own results file."""
    assert main(["bench", "update", "backbone=mamba,rssm", "sizes=xs", "compile_step=true", "repeats=1", "warmup=1",
                 "batch=2", "seq=8", f"out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "update_cpu_compiled.json").read_text())["longdream"]
    assert [(r["backbone"], r["compiled_step"]) for r in rows] == [("mamba", False), ("mamba", True), ("rssm", False)]
    assert rows[1]["dims"]["compile_step"] and not rows[0]["dims"]["compile_step"]
    table = (tmp_path / "update_cpu_compiled.md").read_text()
    assert "mamba xs (compiled step)" in table and ("than eager" in table.split("(compiled step)")[1].split("\n")[0])


def test_unknown_backbone_is_a_one_line_error(capsys):
    assert main(["bench", "update", "backbone=gru"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown backbone 'gru'" in err and "\n" not in err


def test_bench_gpu_without_cuda_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA device" in err and "\n" not in err


def test_bench_gpu_chain_at_toy_sizes(tmp_path):
    """device=cpu quick=true: the three parts (and the scan sweep first, with sweep=true) run and land in
    one report with their wall times."""
    assert main(["bench", "gpu", "device=cpu", "quick=true", "sweep=true", f"out={tmp_path}"]) == 0
    data = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert list(data["parts"]) == ["scan_sweep_cpu", "scan_cpu", "update_cpu", "update_cpu_reinforce", "worldmodel_cpu"]
    report = (tmp_path / "gpu_cpu.md").read_text()
    for part in ("scan", "update", "worldmodel"):
        assert f"## bench {part}" in report and (tmp_path / f"{part}_cpu.json").exists()


def test_update_actor_grad_option(tmp_path, capsys):
    """actor_grad=reinforce (the comparator's recipe) is named in the table; a bad value is a one-line error."""
    assert main(["bench", "update", "sizes=xs", "actor_grad=reinforce", "repeats=1", "warmup=0", "batch=2", "seq=8",
                 f"out={tmp_path}"]) == 0
    assert "actor gradient REINFORCE" in (tmp_path / "update_cpu_reinforce.md").read_text()
    assert main(["bench", "update", "actor_grad=sometimes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "actor_grad must be auto, dynamics or reinforce" in err


def test_matched_rssm_width_is_the_nearest_count():
    """matched_deter: the RSSM width whose agent's parameter count is nearest the target, no neighbour
    (8 narrower or wider) nearer."""
    import bench.update as bu

    a = dict(bu.DEFAULTS)

    def count(d):
        return bu.n_params(bu.build("xs", a, "rssm", d)[0])

    target = count(96) + (count(104) - count(96)) // 3  # a third of the way from 96 to 104
    d = bu.matched_deter("xs", a, target)
    assert d == 96
    assert bu.matched_deter("xs", a, count(96) + 2 * (count(104) - count(96)) // 3) == 104
    assert bu.matched_deter("xs", a, count(64)) == 64


def test_matched_rows_take_ratios_against_the_rssm_of_the_same_count(tmp_path, monkeypatch):
    """match=true: beside each other backbone an RSSM sized to its parameter count, and that backbone's
    ratio is against it, not against the preset RSSM."""
    import bench.update as bu

    real_prepare = bu.prepare
    clock = {"rssm": 2.0, "rssm-matched": 4.0, "s5wm": 3.0}

    def prepare(size, a, backbone=None, compiled=False, graph=False, deter=None):
        step, row = real_prepare(size, a, backbone, compiled, graph, deter)
        key = backbone + ("-matched" if deter is not None else "")

        def timed():
            step()
            return clock[key]
        timed.check = step.check
        return timed, row

    monkeypatch.setattr(bu, "prepare", prepare)
    assert main(["bench", "update", "backbone=s5wm,rssm", "sizes=xs", "match=true", "interleave=true", "repeats=2",
                 "warmup=0", "batch=2", "seq=8", f"out={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "update_cpu_interleaved_matched.json").read_text())["longdream"]
    s5, rssm, matched = rows
    assert matched["matches"] == "s5wm" and "matches" not in rssm
    assert abs(matched["params"] - s5["params"]) < abs(rssm["params"] - s5["params"])
    assert matched["dims"]["deter"] > rssm["dims"]["deter"]
    assert s5["rssm_ratio"]["median"] == 0.75  # 3 / 4, not 3 / 2
    table = (tmp_path / "update_cpu_interleaved_matched.md").read_text()
    assert f"matched to s5wm (deter {matched['dims']['deter']})" in table
