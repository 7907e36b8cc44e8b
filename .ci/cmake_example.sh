#!/usr/bin/env bash
# CI: the C++ example (kernelkit/examples/cpp) against the INSTALLED kernelkit's CMake package:
# configure it with find_package(kernelkit CONFIG), build it and run it in a temporary folder, printing
# cmake's output and the program's (one line per family, then "all checks passed").  The program runs
# without LD_LIBRARY_PATH (the rpath comes with kernelkit::cpu).  Fails on any error or failed check.
set -euo pipefail
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"   # so that `import kernelkit` finds the installed package, not a checkout in the current folder
KK=$($PY -c "import kernelkit, pathlib
print(kernelkit.get_cmake_dir())
print(pathlib.Path(kernelkit.__file__).parent / 'examples' / 'cpp')")
CMAKE_DIR=$(sed -n 1p <<<"$KK")
SRC=$(sed -n 2p <<<"$KK")
echo "CI: C++ example: cmake $(cmake --version | head -n 1 | awk '{print $3}'), sources $SRC"
echo "CI: cmake -S $SRC -B $WORK/build -Dkernelkit_DIR=$CMAKE_DIR"
cmake -S "$SRC" -B "$WORK/build" -Dkernelkit_DIR="$CMAKE_DIR"
cmake --build "$WORK/build" --verbose -j 1
if command -v ldd >/dev/null; then
  echo "CI: $(ldd "$WORK/build/kernelkit_cpp_example" | grep -m1 libkernelkit || echo 'libkernelkit not in ldd output')"
fi
echo "CI: running $WORK/build/kernelkit_cpp_example"
env -u LD_LIBRARY_PATH -u LD_PRELOAD "$WORK/build/kernelkit_cpp_example"
echo "CI: C++ example passed"
