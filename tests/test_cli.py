"""The `objcache` command refuses what it does not do: a flag that is
accepted does what it says, and commands not built yet say so."""
import subprocess
import sys

import pytest


def objcache(*argv, **env):
    return subprocess.run([sys.executable, "-m", "objcache", *argv], capture_output=True,
                          text=True, timeout=60, env=env or None)


def test_server_refuses_metrics_listen_until_metrics_exist(tmp_path):
    out = objcache("server", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                   "--bucket", "s3://b/p", "--metrics-listen", "127.0.0.1:9100")
    assert out.returncode == 2
    assert out.stderr.strip() == ("objcache server: --metrics-listen: metrics are not built "
                                  "in this version; start the server without it")
    assert not (tmp_path / "d").exists()               # refused before anything started


@pytest.mark.parametrize("argv", [["leave", "--cluster", "127.0.0.1:1", "--node", "2"],
                                  ["warmup", "some/path"]])
def test_commands_not_built_say_so(argv):
    out = objcache(*argv)
    assert out.returncode == 2
    assert "not available yet" in out.stderr and "is not built" in out.stderr
