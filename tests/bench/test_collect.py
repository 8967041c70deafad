import json

from bench.collect import main


def test_collect_bench_rows(tmp_path):
    data = main(["env=cartpole", "workers=1,2", "collectors=local", "batches=2", "warmup=1", "collect_every=5",
                 f"out={tmp_path}"])
    rows = data["rows"]
    assert [(r["collector"], r["workers"]) for r in rows] == [("local", 1), ("local", 2)]
    assert [r["frames"] for r in rows] == [10, 20]  # batches x collect_every x workers (action repeat 1)
    assert all(r["fps"] > 0 for r in rows)
    assert json.loads((tmp_path / "collect_cpu.json").read_text())["rows"][1]["workers"] == 2
    assert "1.00x" in (tmp_path / "collect_cpu.md").read_text()
