"""Two CPU processes (gloo): global statistics stay global, and our trainer still equals TRL's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from po_registry.testing import free_port


def test_two_processes_match_grpo_trainer(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("multiprocess_parity.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert len(result["losses"]["ours"]) == 2
    assert result["losses"]["stock"] == pytest.approx(result["losses"]["ours"], abs=1e-6)
    assert result["max_param_diff"] <= 1e-6
