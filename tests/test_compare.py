"""`po-registry compare`: one budget for every method, the baseline always in, runs read back instead of retrained,
a method that cannot run listed with its reason, the leaderboard as markdown, JSON and curves."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from po_registry.compare import Run, leaderboard


def test_the_leaderboard_reads_equal_steps_and_equal_time_with_the_spread_over_seeds():
    """Hand-made runs: the common step is the shortest run's last evaluation and the common time the fastest
    method's training time; means and sample standard deviations over seeds."""
    def run(method, seed, accuracy, seconds, generations=64):
        return Run("addition", method, seed, accuracy, {}, seconds, generations)

    runs = [
        run("grpo", 0, [(0, 0.5), (10, 0.6), (20, 0.7)], [(0, 0.0), (10, 5.0), (20, 10.0)]),
        run("grpo", 1, [(0, 0.5), (10, 0.7), (20, 0.8)], [(0, 0.0), (10, 5.0), (20, 10.0)]),
        run("slow", 0, [(0, 0.5), (10, 0.9), (20, 0.95)], [(0, 0.0), (10, 11.0), (20, 22.0)], 128),
    ]
    board = leaderboard([*runs, Run("guess", "gigpo", 0, [(0, 0.4)], {}, [(0, 0.0)], 64)],
                        {("addition", "gigpo"): "needs a multi-turn task", ("reverse", "remax"): "refused"})
    table = board["tasks"]["addition"]
    assert table["skipped"] == {"gigpo": "needs a multi-turn task"} and board["tasks"]["guess"]["skipped"] == {}
    assert [row["method"] for row in board["tasks"]["guess"]["rows"]] == ["gigpo"]
    assert board["tasks"]["reverse"] == {"final_step": 0, "time_budget": 0.0, "rows": [],
                                         "skipped": {"remax": "refused"}}  # a task where nothing ran is listed
    assert table["final_step"] == 20 and table["time_budget"] == 10.0
    grpo, slow = table["rows"]
    assert grpo["method"] == "grpo" and grpo["accuracy"] == pytest.approx(0.75)
    assert grpo["accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert grpo["accuracy_at_time"] == pytest.approx(0.75)
    # after 10 s the slow method is 10/11 of the way from its start (0.5) to its step-10 evaluation (0.9)
    assert slow["accuracy"] == pytest.approx(0.95) and slow["accuracy_at_time"] == pytest.approx(0.5 + 0.4 * 10 / 11)
    assert slow["generations"] == 128 and slow["seeds"] == [0]


def test_compare_trains_each_method_on_one_budget_and_reads_finished_runs_back(capsys, tmp_path):
    out = tmp_path / "board"
    (tmp_path / "kl.yaml").write_text("beta: 0.04\n")
    argv = ["compare", "--method", "kl", "--method", "gigpo", "--seeds", "0,1", "--steps", "3", "--eval-every",
            "3", "--eval-size", "32", "--output-dir", str(out), "--method-config", f"kl={tmp_path / 'kl.yaml'}"]
    code, printed, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert err.count("addition") == 5  # grpo x 2, kl x 2, gigpo once (then skipped)
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["tasks"]["addition"]["rows"]
    assert [row["method"] for row in rows][0] == "grpo" and {row["method"] for row in rows} == {"grpo", "kl"}
    assert all(row["seeds"] == [0, 1] and row["generations"] == 3 * 64 for row in rows)
    assert "the rows carry no turn structure" in board["tasks"]["addition"]["skipped"]["gigpo"]  # multi-turn only
    assert "| `grpo` | 2 |" in printed and "| `kl` (beta=0.04) | 2 |" in printed and "Not run: `gigpo`" in printed
    assert (out / "addition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method, beta in (("grpo", "0.0"), ("kl", "0.04")):  # the method's own settings reach its runs only
        config = (out / "addition" / method / "seed-1" / "config.yaml").read_text()
        assert "steps: 3" in config and "seed: 1" in config and f"beta: {beta}\n" in config
    # a second call reads the finished runs: nothing is trained again, the table is the same
    stamp = (out / "addition" / "grpo" / "seed-0" / "summary.json").stat().st_mtime_ns
    code, again, err = run_cli(capsys, *argv, "--json")
    assert code == 0 and [line for line in err.splitlines() if line.startswith("[")] == ["[5/6] addition gigpo seed 0"]
    assert json.loads(again)["tasks"] == board["tasks"]
    assert (out / "addition" / "grpo" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp


def test_bad_compare_input_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compare", "--output-dir", str(tmp_path))
    assert code == 2 and err.strip() == ("po-registry compare: error: name the methods to compare with --method "
                                         "(repeatable) or use --all-methods")
    code, _, err = run_cli(capsys, "compare", "--method", "dapo", "--task", "adition")
    assert code == 2 and "--task 'adition': unknown task" in err
    code, _, err = run_cli(capsys, "compare", "--method", "dapo", "--seeds", "0,x")
    assert code == 2 and "--seeds" in err
    code, _, err = run_cli(capsys, "compare", "--method", "dapo", "--method-config", "kl=kl.yaml")
    assert code == 2 and err.strip() == ("po-registry compare: error: --method-config kl=kl.yaml: 'kl' is not among "
                                         "the compared methods")
    code, _, err = run_cli(capsys, "compare", "--method", "kl", "--method-config", f"kl={tmp_path / 'none.yaml'}")
    assert code == 2 and "none.yaml: no such file" in err
