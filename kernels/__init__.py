"""Triton kernels of kernelkit (installed as ``kernelkit.kernels``); one module per family."""
