"""Scale-out: discovery sharded over 2 processes with `accelerate launch` equals a 1-process run exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gaze.strips import save_folder_strip


@pytest.mark.slow
def test_two_process_discovery_equals_one_process(qwen3_path, strip_for, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this Python")
    for i in range(5):
        save_folder_strip(strip_for(32, seed=i), tmp_path / "comics" / f"comic{i}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "comics"), "--quiet"]
    one = subprocess.run([sys.executable, "-m", "gaze.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "gaze.cli", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "ranking.json").read_text())
    b = json.loads((tmp_path / "two" / "ranking.json").read_text())
    assert a["scores"] == b["scores"] and a["matrices"] == b["matrices"] and b["n_strips"] == 5
    assert "top 10 gaze heads" in two.stdout
