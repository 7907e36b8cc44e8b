"""The vq family's C ABI from outside torch: numpy through ctypes (fresh interpreter, no torch import)
and a C99 program compiled against the installed header and library, each once per CPU ISA variant
(KERNELKIT_CPU_ISA caps the variant the library dispatches to)."""
from __future__ import annotations



from cabi_common import make_cabi_tests

VQ_SYMBOLS = ("kk_vq_check_codes", "kk_vq_dequantize_cpu", "kk_vq_linear_fwd_cpu", "kk_vq_linear_bwd_cpu",
              "kk_vq_assign_cpu")


(test_vq_header_is_installed_and_symbols_exported, test_vq_cabi_from_numpy_ctypes_without_torch,
 cabi_exe, test_vq_cabi_from_a_c_program) = make_cabi_tests(
    "vq", VQ_SYMBOLS, lambda n: "vq" in n and not n.startswith("kk_vq_"))
