"""A page view dying inside cyclic garbage must not crash the process
(the collector used to clear the buffer exporter's arena reference before
the view released its buffer: a segfault, found by fsstress)."""
import subprocess
import sys

CODE = """
import gc
from objcache._ext import PageArena
arena = PageArena(4096, 4)
for n in range(200):
    i = arena.allocate()
    mv = arena.view(i)
    class Holder: pass
    h = Holder(); h.mv = mv; h.self = h          # a cycle holds the only view
    del mv, h
    gc.collect()
    arena.free(i)
print("ok")
"""


def test_page_view_in_cyclic_garbage_is_released_safely():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])
