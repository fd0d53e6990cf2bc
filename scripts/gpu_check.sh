#!/usr/bin/env bash
# make gpu-check: on a GPU machine with no network and its own CUDA PyTorch (never installed from here), install
# the wheels of `make gpu-wheels` next to it, run the device-aware tests on CUDA and the short device benchmark,
# and write a Markdown report. Environment: GPU_PYTHON (the machine's python, default python3), GPU_WHEELS (default
# gpu-wheels), GPU_REPORT (default gpu-check-report.md), GPU_CHECK_VENV (default .gpu-venv).
set -euo pipefail
PY=${GPU_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu-wheels}
REPORT=${GPU_REPORT:-gpu-check-report.md}
VENV=${GPU_CHECK_VENV:-.gpu-venv}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__)"
[ -f "$WHEELS/requirements.txt" ] || { echo "no $WHEELS/requirements.txt: run 'make gpu-wheels GPU_PYTHON_VERSION=X.Y' where the registries are reachable and copy $WHEELS here" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"   # sees the machine's torch
"$VENV/bin/python" -m pip install -q --no-index --no-deps --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --force-reinstall "$WHEELS"/fluence_fairseq-*.whl
"$VENV/bin/python" -c "import torch, fairseq, fluence_fairseq; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
set +e
timeout 300 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -k cuda tests/modules tests/ops tests/test_fairseq_cli.py 2>&1 | tee gpu-tests.log
status=${PIPESTATUS[0]}
set -e
timeout 180 "$VENV/bin/python" -m benchmarks.gpu_check --out "$REPORT" --tests-log gpu-tests.log
echo "report: $REPORT (tests exit status $status)"
exit "$status"
