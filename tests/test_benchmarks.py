"""The benchmark code runs end to end on tiny sizes (it measures nothing here; no timing is asserted)."""

import json

from benchmarks.__main__ import main


def test_benchmarks_run_on_a_tiny_size_and_write_the_report(tmp_path, capsys):
    assert main(["--quick", "--cases", "rollout,training,metrics,run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    for key in ("rollout.speedup_vs_generate", "training.cpu_peak_fraction", "metrics.seconds_1m", "run.seconds"):
        case, metric = key.split(".")
        assert result[case][metric] > 0, key
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]["versions"]
    assert result["raw"]["rollout"]["completions"] == 4 * 2
    assert result["training"]["flops_per_step"]["total"] > 0
    table = (tmp_path / "latest.md").read_text()
    assert "rollouts (completions/s)" in table and "`caopd run`" in table
