#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install what the GPU checks need, run the GPU tests,
# then the fit benchmark at 10,000 objects on the GPU (both statistics, the default cube and a cube
# with a Sersic-index axis), and print a table.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (from the repository root; OUT_DIR default: gpu_check)
#
# Installing: with network, `pip install -e '.[test,sim]'` and CuPy (cupy-cuda12x) when no CuPy is
# importable; without network, wheels in .whl/ (pip download ... -d .whl, see benchmarks/README.md)
# are installed from there, and a CuPy already present (cupy-cuda12x or cupy-cuda13x) is used.
# Every step's output goes to OUT_DIR/*.log; the exit status is non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, log, remember failures
    local name=$1; shift
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $out/$name.log)"; failed+=("$name"); fi
    tail -n 25 "$out/$name.log"
}
failed=()

# -- install ---------------------------------------------------------------------------------------
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
if [ -d .whl ]; then
    step install "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dre_site .whl/*.whl
    export PYTHONPATH="/tmp/dre_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    step install "$py" -m pip install -q -e '.[test,sim]'
    "$py" -c 'import cupy' 2>/dev/null || step install-cupy "$py" -m pip install -q cupy-cuda12x
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step cupy "$py" -c 'import cupy, numpy; x = cupy.arange(10.0); print("cupy", cupy.__version__, cupy.cuda.runtime.getDeviceCount(), "device(s)", float((x * x).sum()))'

# -- GPU tests: every test marked gpu, and the device-namespace tests that stand in for it on CPU ----
step tests-gpu "$py" -m pytest -q -p no:cacheprovider -rs -m gpu tests
step tests-device "$py" -m pytest -q -p no:cacheprovider -rs tests/test_worker_gpu.py tests/test_device_namespace.py

# -- the benchmark at 10,000 objects: default cube and index cube, both statistics, GPU and a CPU core --
step bench-gpu "$py" benchmarks/bench_fit.py --backend gpu --objects 10000 --index-objects 10000 \
     --command-objects 10000 --repeat 2
step bench-cpu "$py" benchmarks/bench_fit.py --backend cpu --objects 2048 --skip command --repeat 2

# -- table ----------------------------------------------------------------------------------------
echo
echo "== summary (objects/s; ratios against limits measured in the same run)"
for name in bench-gpu bench-cpu; do
    echo "-- $name"
    sed -n '/^ *objects\/s/,$p' "$out/$name.log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
