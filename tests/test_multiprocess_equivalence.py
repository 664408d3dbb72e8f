"""Every method, alone and in its documented compositions, on 2 CPU processes (gloo) against 1: with the same global
batch and the same samples, the advantages, the losses, the gradient and the logged metrics are the same.

``multiprocess_equivalence.py`` runs every case once under a single process and once under ``torchrun
--nproc_per_node 2``; generation is scripted per row, so both launches train on identical completions (single-turn
addition prompts and the multi-turn guess environment, with length-1, truncated, unscorable and all-equal-reward rows,
fully masked rows and environment holes). No method needs to be skipped: OPD gets a second tiny model as its teacher,
process-reward a token-reward function, the turn-credit methods the guess environment. Dynamic sampling runs with
``dynamic_sampling_max_rounds=0``: its refill rounds draw fresh prompts per process (other samples by design), and
their collective decision is tested in ``plugins/dapo/tests``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from po_registry.testing import free_port

TOLERANCE = 1e-5
SCRIPT = Path(__file__).with_name("multiprocess_equivalence.py")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """(one process, two processes): each the script's results, both launches run side by side."""
    out = tmp_path_factory.mktemp("equivalence")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    single = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    double = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(SCRIPT), str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for process in (single, double):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    return tuple(torch.load(out / f"world-{w}.pt", weights_only=False) for w in (1, 2))


def _padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([row + [0.0] * (width - len(row)) for row in rows])


def test_every_method_is_the_same_on_two_processes_as_on_one(launches):
    from po_registry import get_registry

    one, two = launches
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(get_registry().methods) <= set(one["cases"]), "a registered method has no case"
    problems = []
    for name, alone in one["cases"].items():
        pair = two["cases"][name]
        if "error" in alone or "error" in pair:
            problems.append(f"{name}: raised {alone.get('error')} / {pair.get('error')}\n{alone.get('traceback', '')}")
            continue
        width = max(len(alone["advantages"][0]), len(pair["advantages"][0]))
        differences = {
            "advantages": (_padded(alone["advantages"], width) - _padded(pair["advantages"], width)).abs().max(),
            "losses": (torch.tensor(alone["losses"]) - torch.tensor(pair["losses"])).abs().max(),
            "gradient": (alone["gradient"] - pair["gradient"]).abs().max(),
        }
        for what, difference in differences.items():
            if difference > TOLERANCE:
                problems.append(f"{name}: {what} differ by {difference.item():.3g}")
        assert alone["gradient"].abs().max() > 1e-3, f"{name}: no gradient, nothing compared"
        for metric, value in alone["metrics"].items():  # what the main process logs
            other = pair["metrics"].get(metric)
            if other is None or abs(other - value) > TOLERANCE * max(1.0, abs(value)):
                problems.append(f"{name}: metric {metric} is {value} on 1 process, {other} on 2")
    assert not problems, "\n".join(problems)


def test_the_shared_batch_has_the_degenerate_rows(launches):
    """The comparison covers length-1 completions, fully masked rows, environment holes, all-equal rewards and an
    unscorable completion (read off the one-process launch)."""
    cases = launches[0]["cases"]
    lengths = torch.tensor(cases["grpo"]["mask"]).sum(dim=1)
    assert (lengths == 1).sum() >= 2
    assert (torch.tensor(cases["grpo (loss_type grpo, mask truncated)"]["mask"]).sum(dim=1) == 0).any()
    holes = torch.tensor(cases["grpo (guess: environment holes)"]["mask"])
    assert ((holes[:, :-1] == 0) & (holes[:, 1:] == 1)).any()  # a masked token followed by a loss token
    advantages = [row[0] for row in cases["grpo"]["advantages"]]
    assert advantages[8:12] == [0.0] * 4  # the all-equal group: A = 0
    assert advantages[1] == 0.0  # the unscorable empty completion (every reward None): A = 0


# Hand-derived (the micro-batch in multiprocess_equivalence.SELECTION_*): A = +1, -1, +1, -1 per row.
# "split", 12 loss tokens: mean log pi = -24 / 12 = -2, mean A = 0, so Cov = (log pi + 2) A is 1 at (2, 0), (2, 1),
# (3, 0), (3, 1) (all on the second process) and 0 or -1 elsewhere.
#   Clip-Cov (window (0.5, 5), fraction 0.34, r = 1): budget int(0.34 * 12) = 4 = the 4 candidates, all removed
#   whatever the draw; the others keep -r A = -A. (Per process before: int(0.34 * 6) = 2 removed, row 3 kept [1, 1, 1].)
#   KL-Cov (fraction 0.1, log r = 0.5): k = max(1, int(1.2)) = 1, the first of the tied top tokens, (2, 0); loss
#   -e^0.5 A everywhere (e^0.5 = 1.648721) plus |log r| = 0.5 there. (Per process before: one token each, 2 in all.)
# "one slot empty", rows 2-3 masked (one process has no loss token): over rows 0-1, mean log pi = -2, mean A = 0,
# Cov(0, 0) = 1 (the only candidate and the top token), Cov(0, 2) = -1, 0 elsewhere.
E = 1.648721
SELECTIONS = {
    "clip-cov (split)": [[-1, -1, -1], [1, 1, 1], [0, 0, -1], [0, 0, 1]],
    "kl-cov (split)": [[-E, -E, -E], [E, E, E], [-E + 0.5, -E, -E], [E, E, E]],
    "clip-cov (one slot empty)": [[0, -1, -1], [1, 1, 1], [0, 0, 0], [0, 0, 0]],
    "kl-cov (one slot empty)": [[-E + 0.5, -E, -E], [E, E, E], [0, 0, 0], [0, 0, 0]],
}
FRACTIONS = {"clip-cov (split)": 4 / 12, "kl-cov (split)": 1 / 12, "clip-cov (one slot empty)": 1 / 6,
             "kl-cov (one slot empty)": 1 / 6}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_covariance_selections_are_taken_over_every_process(launches, name):
    """Clip-Cov and KL-Cov pick the same tokens from the same micro-batch on one process and on two (means, token
    budget and choice over both processes' tokens), also when one process has no loss token."""
    for launch in launches:
        got = launch["selections"][name]
        assert torch.allclose(torch.tensor(got["loss"]), torch.tensor(SELECTIONS[name], dtype=torch.float32),
                              atol=1e-5), (launch["world_size"], got["loss"])
        (fraction,) = got["metrics"].values()
        assert fraction == pytest.approx(FRACTIONS[name])


def test_fsdp_on_cpu_processes_is_refused_not_dropped(tmp_path):
    """accelerate 1.16 shards with FSDP only across GPU-type processes: launched with examples/accelerate/fsdp2.yaml
    on 2 CPU processes it would train plain DDP without a word (before: both processes trained, fsdp disabled). The
    trainer refuses with one error naming FSDP and the way to train on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(Path(__file__).with_name("multiprocess_fsdp.py")), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        outcome = (tmp_path / f"rank-{rank}.txt").read_text()
        assert outcome.startswith("refused: FSDP was asked for") and "torchrun --nproc_per_node" in outcome, outcome
