#!/usr/bin/env bash
# The Triton kernels against Triton 3.6 (the release on the GPU machines) as well as the installed one:
# the ahead-of-time compile for sm_80 / sm_90 (tests/triton_aot.py) and the interpreter tests.
# Triton 3.6 goes into a folder of its own (reused once there) that is put first on PYTHONPATH for
# these commands only; the main environment is not touched.  Run after `pip install .` (as .ci/run
# does): the tests import the installed kernelkit, so it is checked to match this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VER=3.6.0
DIR=${KERNELKIT_TRITON36_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kernelkit/triton-$VER}
# numpy < 2.4 beside it: Triton 3.6's interpreter turns 1-element arrays into ints with int(), which
# numpy 2.4 made an error ("only 0-dimensional arrays can be converted to Python scalars"; fixed in
# later Triton).  The pin shadows the main numpy in these processes only; torch 2.13 runs with it.
REQS=("triton==$VER" "numpy<2.4")
SECONDS=0

# Fails unless `triton` in a process with PYTHONPATH=$DIR is $VER, imported from $DIR.
check_triton() {
  PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DIR" "$VER" <<'EOF'
import os, sys
want_dir, want_ver = os.path.realpath(sys.argv[1]), sys.argv[2]
import numpy, triton
where = os.path.realpath(triton.__file__)
if triton.__version__ != want_ver or not where.startswith(want_dir + os.sep):
    sys.exit(f"triton36: got triton {triton.__version__} from {where}, wanted {want_ver} from {want_dir}")
if tuple(int(v) for v in numpy.__version__.split(".")[:2]) >= (2, 4):
    sys.exit(f"triton36: numpy {numpy.__version__} breaks Triton {want_ver}'s interpreter")
print(f"triton36: triton {triton.__version__} from {where}, numpy {numpy.__version__}")
EOF
}

if ! check_triton >/dev/null 2>&1; then
  echo "triton36: installing ${REQS[*]} into $DIR"
  rm -rf "$DIR.partial"   # install beside, then move: an interrupted install is never reused
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
      --target "$DIR.partial" "${REQS[@]}"
  rm -rf "$DIR"
  mv "$DIR.partial" "$DIR"
fi
check_triton
echo "triton36: ready after ${SECONDS}s"

# The interpreter tests import kernelkit.kernels when kernelkit is installed: it must be this checkout's.
"$PY" - <<'EOF'
import filecmp, importlib.util, pathlib, sys
spec = importlib.util.find_spec("kernelkit")   # finds the package without importing it
if spec is None:
    sys.exit(0)                                  # not installed: the tests import kernels/ from here
installed = pathlib.Path(next(iter(spec.submodule_search_locations))) / "kernels"
stale = [p.name for p in sorted(pathlib.Path("kernels").glob("*.py"))
         if not (installed / p.name).exists() or not filecmp.cmp(p, installed / p.name, shallow=False)]
if stale:
    sys.exit(f"triton36: the installed kernelkit ({installed}) differs from this checkout in {stale}: "
             "pip install . first")
EOF

# Both commands check, in their own process, that they imported Triton $VER.
export PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}"
t=$SECONDS
"$PY" tests/triton_aot.py --arch 80 90 --expect-triton "$VER"
echo "triton36: AOT compile took $((SECONDS - t))s"

t=$SECONDS
set +e
# (triton is looked at after the run: importing it first would come before tests/conftest.py sets
# TRITON_INTERPRET, which must precede the first import; the tests run on two pytest-xdist workers)
"$PY" - "$VER" <<'EOF'
import sys
import pytest
rc = pytest.main(["tests/test_monarch_triton.py", "tests/test_sparse_triton.py", "tests/test_vq_triton.py",
                  "tests/test_ot_triton.py", "tests/test_mfac_triton.py", "tests/test_rbf_triton.py", "-q", "-n", "2",
                  "-p", "no:cacheprovider",
                  "-W", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"])
# (the two xdist workers import triton from the same PYTHONPATH as this process)
import triton  # noqa: E402
used = getattr(triton, "__version__", "none")
if used != sys.argv[1]:
    sys.exit(f"triton36: the tests ran with triton {used}, not {sys.argv[1]}")
sys.exit(rc)
EOF
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "triton36: pytest collected no tests" >&2; exit 1; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
echo "triton36: interpreter tests took $((SECONDS - t))s; all done in ${SECONDS}s with triton $VER"
