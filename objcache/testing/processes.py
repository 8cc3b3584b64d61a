"""Child processes of tests, benchmarks and the demo."""
from __future__ import annotations

import signal
import subprocess


def stop_processes(procs, timeout: float = 30.0) -> None:
    """SIGTERM every live process (all at once, so their shutdowns overlap),
    wait up to ``timeout`` seconds for each, kill what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
