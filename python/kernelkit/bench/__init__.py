"""Benchmarks of kernelkit's ops against the baselines they replace.

Run ``python -m kernelkit.bench --help``.  Each family module (``monarch``, ``sparse``, ``vq``, ``ot``, ``mfac``, ``rbf``) defines its cases and
providers once; the CLI (``__main__``) and the pytest-benchmark files in ``bench/`` both use them.
Timing lives in ``_timing`` and the table/CSV/plot output in ``_report``.
"""
FAMILIES = ("monarch", "sparse", "vq", "ot", "mfac", "rbf")

__all__ = ["FAMILIES"]
