"""An NF4 load prints nothing about bitsandbytes' hub-kernel lookup (models/loading.py, import_bitsandbytes).

The lookup runs only on a CPU with AVX512-BF16, so each check runs in a fresh interpreter that makes
bitsandbytes see one (this machine's CPU may have none), with the Hub offline as everywhere here."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

# Run first in the child: bitsandbytes.functional.has_avx512bf16 answers True, as on the GPU hosts' Xeons.
FAKE_AVX512_BF16 = """
import importlib.abc, importlib.machinery, sys

class _SaysAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _SaysAvx512Bf16())
"""


def _child(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    r = subprocess.run([sys.executable, "-c", FAKE_AVX512_BF16 + code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_nf4_load_prints_no_hub_kernel_lookup(tmp_path):
    # Without phikit's import, the lookup speaks: else this test would prove nothing.
    plain = _child("import warnings; warnings.simplefilter('always'); import bitsandbytes")
    if "gemm_4bit_forward" not in plain:
        pytest.skip("this bitsandbytes no longer looks up a hub kernel at import")
    out = _child(f"""
import warnings; warnings.simplefilter('always')
from pathlib import Path
from tiny import build_model_dir
import phikit
m = phikit.load(str(build_model_dir("phi3", Path({str(tmp_path)!r}) / "m")), backend="transformers", device="cpu", quant="nf4")
assert m.info()["quant"] == "nf4", m.info()
print("LOADED")
""")
    assert "LOADED" in out
    bad = [ln for ln in out.splitlines() if "gemm_4bit_forward" in ln or "trust_remote_code" in ln or "kernels-community" in ln]
    assert bad == []


def test_filter_drops_only_the_lookup_lines():
    from phikit.models.loading import _drop_hub_kernel_lookup

    def rec(msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, msg, args, None)

    online = ("Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust status. "
              "Set trust_remote_code=True or add the repository ID to the trust_remote_code allowlist")
    assert not _drop_hub_kernel_lookup(rec("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", online))
    assert not _drop_hub_kernel_lookup(rec("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                           "because Hugging Face Hub is in offline mode."))
    assert _drop_hub_kernel_lookup(rec("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is offline."))
    assert _drop_hub_kernel_lookup(rec("bitsandbytes library load error: libcudart.so not found"))
