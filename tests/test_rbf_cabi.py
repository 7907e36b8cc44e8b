"""The rbf family's C ABI: numpy through ctypes (fresh interpreter, no torch import) and a C99 program
compiled against the installed header and library (tests/cabi_rbf_numpy.py, tests/cabi_rbf.c), each once
per CPU ISA variant (KERNELKIT_CPU_ISA caps the variant the library dispatches to).  The C program also
checks the float32 sine against double sin (|err| <= 2^-21 for |t| <= 2^17, rbf.h)."""
from __future__ import annotations

from cabi_common import make_cabi_tests

RBF_SYMBOLS = ("kk_rbf_grid_layout", "kk_rbf_grid_build_cpu", "kk_rbf_knn_cpu", "kk_rbf_features_fwd_cpu",
               "kk_rbf_features_bwd_cpu")

(test_rbf_header_is_installed_and_symbols_exported, test_rbf_cabi_from_numpy_ctypes_without_torch,
 cabi_exe, test_rbf_cabi_from_a_c_program) = make_cabi_tests(
    "rbf", RBF_SYMBOLS, lambda n: "_rbf_" in n and not n.startswith("kk_rbf_"))
