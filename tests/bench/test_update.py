"""`longdream bench update`: its RSSM-only presets are refused for other backbones, not mislabelled."""
import json

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
