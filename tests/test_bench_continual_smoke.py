"""The smoke preset of `bench continual`, end to end on the real default model (and its resume)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_smoke_preset_writes_results_and_resumes(tmp_path, lifealign_home, shared_data):
    out = tmp_path / "bench"
    env = {**os.environ, "LIFEALIGN_HOME": str(lifealign_home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lifealign_lite.cli.app", "bench", "continual", "--preset", "smoke", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["_meta"]["tasks"] == ["truthfulqa", "safe-rlhf"]
    for method in ("seq-dpo", "ewc", "olora", "lifealign", "lifealign-bank"):
        entry = results[method]
        R = entry["matrices"]["pref_acc"]
        assert len(R) == 2 and all(len(row) == 2 for row in R)
        assert all(0.0 <= v <= 1.0 for row in R for v in row)
        for metric in ("pref_acc", "lennorm_acc", "margin"):
            assert set(entry[metric]) == {"Last", "AP", "BWT", "FWT"}
            assert all(v is not None for v in entry[metric].values())
        assert (out / f"heatmap-{method}.png").stat().st_size > 1000
    assert (out / "ap-bwt.png").is_file()
    assert (out / "last-vs-margin-bwt.png").stat().st_size > 1000
    assert "| lifealign |" in (out / "results.md").read_text()
    # ewc keeps its Fisher in the bank (one per version); olora and lifealign need none
    assert all((v / "fisher.safetensors").is_file() for v in (out / "banks" / "ewc" / "versions").iterdir())
    assert not any((out / "banks" / "olora" / "versions").glob("*/fisher.safetensors"))
    # lifealign-bank reuses lifealign's training: one bank, two tasks
    assert not (out / "banks" / "lifealign-bank").exists()

    # a second start finds every step done: same scores, no training
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    for method in ("seq-dpo", "ewc", "olora", "lifealign", "lifealign-bank"):
        assert again[method]["matrices"] == results[method]["matrices"]
    assert len(list((out / "banks" / "lifealign" / "runs").iterdir())) == 2
