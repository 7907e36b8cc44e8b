"""The mfac family's C ABI: numpy through ctypes (fresh interpreter, no torch import) and a C99 program
compiled against the installed header and library (tests/cabi_mfac_numpy.py, tests/cabi_mfac.c), each
once per CPU ISA variant (KERNELKIT_CPU_ISA caps the variant the library dispatches to)."""
from __future__ import annotations

from cabi_common import make_cabi_tests

MFAC_SYMBOLS = ("kk_mfac_static_rows",) + tuple(
    f"kk_mfac_{op}_cpu" for op in ("dots", "combine", "diag", "static_setup", "window_update", "window_rebuild",
                                   "window_coef"))

(test_mfac_header_is_installed_and_symbols_exported, test_mfac_cabi_from_numpy_ctypes_without_torch,
 cabi_exe, test_mfac_cabi_from_a_c_program) = make_cabi_tests(
    "mfac", MFAC_SYMBOLS, lambda n: "_mfac_" in n and not n.startswith("kk_mfac_"))
