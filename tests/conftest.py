"""Test-session setup shared by every family.

Without a CUDA GPU, the Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be in
the environment before triton is first imported, so it is set here, before any test module loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The README's test command runs two pytest-xdist workers (CI has two cores).  Each worker runs the
# kernels on one thread: two workers with two OpenMP threads each oversubscribe the cores, and
# spin-waiting OpenMP barriers then made small calls 10-60x slower here.  The threaded paths are still
# exercised: the C-ABI tests pass explicit thread counts, and a run without -n uses all threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Hypothesis profiles (property tests, tests/test_monarch_properties.py), chosen by the environment
# variable HYPOTHESIS_PROFILE:
#   ci   (default): the same examples on every run (derandomized, fixed seed), so CI is reproducible
#        and `python -m pytest tests -q` needs no flags; each test sets its own max_examples as a
#        fraction of this profile's 1000.
#   slow: 10x the examples, freshly random each run, to look further (e.g. nightly or by hand).
# No deadline: timings on shared CI machines and under the Triton interpreter vary too much.  A
# failure prints its reproduction blob (@reproduce_failure) since no example database is kept.
try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves; everything else still runs
    pass
else:
    settings.register_profile("ci", max_examples=1000, derandomize=True, deadline=None, database=None,
                              print_blob=True)
    settings.register_profile("slow", max_examples=10_000, derandomize=False, deadline=None,
                              database=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run bench/device_check.sh on the device machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """NaN-fill every torch.empty for the duration of a test, so that an output element a kernel
    forgets to write fails the comparison (torch's fill_uninitialized_memory under deterministic
    mode)."""
    import torch.utils.deterministic as det

    prev_mode, prev_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_mode, warn_only=prev_warn)


def pytest_terminal_summary(terminalreporter):
    """One line per property test with its count of passing examples (from hypothesis's own
    statistics, which its plugin keeps on each report), so the CI log shows how much was checked."""
    import re

    counts = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = getattr(report, "__dict__", {}).get("_hypothesis_stats")
            if stats and getattr(report, "when", "") == "teardown":
                n = sum(int(m) for m in re.findall(r"(\d+) passing examples?", stats))
                counts[report.nodeid] = counts.get(report.nodeid, 0) + n
    if not counts:
        return
    terminalreporter.section("hypothesis: passing examples per property test")
    for nodeid, n in sorted(counts.items()):
        terminalreporter.write_line(f"{n:7d}  {nodeid.split('::', 1)[-1]}")
    terminalreporter.write_line(f"hypothesis: {len(counts)} property tests, {sum(counts.values())} examples")
