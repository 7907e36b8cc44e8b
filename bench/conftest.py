"""Collect ``bench_*.py`` files, but only when bench/ (or a file in it) is named on the command line.

The main suite (pyproject testpaths = tests) never reaches this folder; this hook makes
``pytest bench/ --benchmark-only`` work although the files are not named test_*.py, and keeps a
bare ``pytest .`` from running the benchmarks.
"""
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _named_explicitly(config) -> bool:
    for arg in config.args:
        p = Path(str(arg).split("::")[0]).resolve()
        if p == _HERE or _HERE in p.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it already
    if not _named_explicitly(parent.config):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
