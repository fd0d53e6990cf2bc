#!/usr/bin/env bash
# make gpu-check: on a GPU machine with no network and its own CUDA PyTorch (never installed from here), install
# what the machine lacks from the wheels of `make gpu-wheels`, run the device-aware tests on CUDA and the short
# device benchmark, and write a Markdown report. The wheels go into a directory on PYTHONPATH rather than a venv:
# the machine's python3 may itself live in a venv, whose packages (torch among them) a new venv would not see.
# Environment: GPU_PYTHON (the machine's python, default python3), GPU_WHEELS (default gpu-wheels), GPU_OUT (where
# the report and logs go, default .), GPU_SITE (default .gpu-site), GPU_TEST_WORKERS (pytest-xdist processes,
# default 4), GPU_TEST_TIMEOUT / GPU_BENCH_TIMEOUT (seconds, default 300 / 180).
set -euo pipefail
PY=${GPU_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu-wheels}
OUT_DIR=${GPU_OUT:-.}
SITE=${GPU_SITE:-.gpu-site}
WORKERS=${GPU_TEST_WORKERS:-4}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__)"
[ -f "$WHEELS/requirements.txt" ] || { echo "no $WHEELS/requirements.txt: run 'make gpu-wheels GPU_PYTHON_VERSION=X.Y' where the registries are reachable and copy $WHEELS here" >&2; exit 1; }
mkdir -p "$OUT_DIR" "$SITE"
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" scripts/gpu_wheels.py --missing "$WHEELS/requirements.txt" > "$OUT_DIR/gpu-missing.txt"
echo "installing what this machine lacks: $(tr '\n' ' ' < "$OUT_DIR/gpu-missing.txt")"
if [ -s "$OUT_DIR/gpu-missing.txt" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --find-links "$WHEELS" -r "$OUT_DIR/gpu-missing.txt"
fi
"$PY" -c "import torch, fairseq, numpy, fluence_fairseq; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| fairseq', fairseq.__version__, '| numpy', numpy.__version__)"
set +e
timeout "${GPU_TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile -k cuda \
  tests/modules tests/ops tests/test_fairseq_cli.py 2>&1 | tee "$OUT_DIR/gpu-tests.log"
status=${PIPESTATUS[0]}
set -e
timeout "${GPU_BENCH_TIMEOUT:-180}" "$PY" -m benchmarks.gpu_check --out "$OUT_DIR/gpu-check-report.md" \
  --tests-log "$OUT_DIR/gpu-tests.log"
echo "report: $OUT_DIR/gpu-check-report.md (tests exit status $status)"
exit "$status"
