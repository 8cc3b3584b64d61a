"""`objcache demo` end to end at a small size: Ceph RGW, a 3-node cluster,
two pods; the warm load through the second pod costs no S3 GET."""
import re
import subprocess
import sys

import pytest

from objcache.testing.s3servers import rgw_available

pytestmark = pytest.mark.rgw


def test_demo_runs_and_the_warm_pod_reads_no_s3():
    if not rgw_available():
        pytest.fail("the demo needs Ceph RGW (scripts/install-system-deps.sh)")
    out = subprocess.run([sys.executable, "-m", "objcache", "demo", "--size", "32MiB"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(
        r"^(straight from S3.*?|pod 1, cold.*?|pod 2, another.*?)\s+[\d.]+ s\s+[\d.]+\s+(\d+)$",
        out.stdout, re.M)}
    assert len(rows) == 3, out.stdout
    cold = next(v for k, v in rows.items() if k.startswith("pod 1"))
    warm = next(v for k, v in rows.items() if k.startswith("pod 2"))
    assert cold > 0 and warm == 0, out.stdout
