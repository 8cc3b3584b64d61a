"""The deterministic simulator runs clean and replays exactly."""
import json
import subprocess
import sys

from objcache.raft import sim


def test_seeds_pass_and_exercise_faults():
    stats_total = {}
    for seed in range(40):
        ok, stats, why = sim.run_seed(seed, None, 2500)
        assert ok, why
        for k, v in stats.items():
            stats_total[k] = stats_total.get(k, 0) + v
    # The schedules really contain what they claim to.
    for k in ("elections", "snapshots_installed", "crashes", "torn",
              "conf_changes", "transfers", "partitions"):
        assert stats_total[k] > 0, k
    assert stats_total["ops_ok"] > 1000


def test_seed_replays_exactly():
    a = sim.run_seed(123, 5, 1500)
    b = sim.run_seed(123, 5, 1500)
    assert a == b


def test_cli_summary_and_exit_status():
    out = subprocess.run([sys.executable, "-m", "objcache.raft.sim", "--seeds", "3",
                          "--seed-start", "7", "--nodes", "3", "--steps", "800"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["seeds"] == 3 and summary["failures"] == 0


def test_cli_rejects_bad_node_count():
    out = subprocess.run([sys.executable, "-m", "objcache.raft.sim", "--nodes", "9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "between 3 and 7" in out.stderr
