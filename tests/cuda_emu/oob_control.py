"""Negative control for the ASan+UBSan run of the CUDA host emulation (.ci/run): a scratch copy of
csrc/cuda/monarch.cu whose GEMM tile loader reads one row past its operand (`x <= X` for `x < X`)
must be stopped by AddressSanitizer with a heap-buffer-overflow inside the kernel.  If this passes
silently, the sanitizer run is not checking global-memory bounds and its green result means nothing.

    python tests/cuda_emu/oob_control.py        # exit 0 when ASan caught the bug
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from cuda_emu import CSRC, build  # noqa: E402

BUG = ("S[kk * STRIDE + xx] = (x < X && kx < ke) ? to_f(G[x * sx + kx * sk]) : 0.f;",
       "S[kk * STRIDE + xx] = (x <= X && kx < ke) ? to_f(G[x * sx + kx * sk]) : 0.f;")

# The child calls the backward on exact-size numpy buffers (no torch: nothing else in the process).
CHILD = r"""
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
I, P = ctypes.c_int64, ctypes.c_void_p
k, q, p, l, s, r = 4, 6, 5, 3, 7, 8
B = 37
rng = np.random.default_rng(0)
x, w1, w2, dout = (rng.standard_normal(n).astype(np.float32) for n in (B * k * p, k * q * p, l * s * r, B * l * s))
dx, dw1, dw2 = (np.empty(n, np.float32) for n in (B * k * p, k * q * p, l * s * r))
nb = ctypes.c_int64()
assert lib.kk_monarch_bwd_cuda_workspace_size(0, I(B), *map(I, (k, q, p, l, s, r)), ctypes.byref(nb)) == 0
ws = np.empty(max(nb.value, 1), np.uint8)
ptr = lambda a: P(a.ctypes.data)
st = lib.kk_monarch_bwd_cuda(0, I(B), *map(I, (k, q, p, l, s, r)), ptr(x), I(k * p), ptr(w1), ptr(w2), ptr(dout),
                             I(l * s), ptr(dx), I(k * p), ptr(dw1), ptr(dw2), ptr(ws), I(nb.value), P(0))
print("returned", st)
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "cuda"
        shutil.copytree(CSRC / "cuda", scratch)
        src = (scratch / "monarch.cu").read_text()
        if src.count(BUG[0]) != 1:
            print("oob-control: the tile loader changed; update BUG in tests/cuda_emu/oob_control.py", file=sys.stderr)
            return 1
        (scratch / "monarch.cu").write_text(src.replace(*BUG))
        lib = build(sanitize=True, cuda_dir=scratch)
        gcc = os.environ.get("CC", "gcc")
        preload = ":".join(subprocess.run([gcc, f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
                           for n in ("libasan.so", "libubsan.so"))
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(lib)], capture_output=True, text=True, env=env,
                              timeout=600)
    report = proc.stdout + proc.stderr
    m = re.search(r"AddressSanitizer: (heap-buffer-overflow).*?\n(READ|WRITE) of size (\d+).*?#0 0x[0-9a-f]+ in (.+?) "
                  r"(/\S+:\d+)", report, re.S)
    if proc.returncode == 0 or not m:
        print(report[-4000:], file=sys.stderr)
        print("oob-control: FAILED, the out-of-bounds read was not caught", file=sys.stderr)
        return 1
    print(f"oob-control: ASan stopped the deliberate off-by-one tile bound: {m.group(1)}, {m.group(2)} of "
          f"{m.group(3)} bytes in {m.group(4)} ({Path(m.group(5)).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
