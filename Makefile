# make demo: create/reuse .venv, install, run the Bible en->es adaptive-span translation demo
# make test: same environment, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to a CPU-sized build here: an unpinned torch pulls several GB of CUDA wheels
TORCH := torch==2.13.0
SOURCES := setup.py $(shell find fluence_fairseq -name '*.py' 2>/dev/null)
STAMP := $(VENV)/.installed
# test processes (pytest-xdist), one per core of the 2-core CI machine; whole files go to one worker, so a file's
# module fixtures are built once
TEST_WORKERS ?= 2

.PHONY: demo test lm-demo docs bench bench-sparse bench-pruning bench-weights bench-memory bench-paired bench-decoding gpu-wheels gpu-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/translation/run.sh

lm-demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/language_model/run.sh

docs: $(STAMP)
	$(PY) docs/generate.py

bench: $(STAMP)
	$(PY) -m benchmarks.attention --preset adaptive_span --out benchmarks/results/adaptive_span

bench-sparse: $(STAMP)
	$(PY) -m benchmarks.models --preset sparse --threads 1 --out benchmarks/results/sparse_training

bench-pruning: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.pruning --repeats 7 --json benchmarks/results/pruning.json | tee benchmarks/results/pruning.md

bench-weights: $(STAMP)
	$(PY) -m benchmarks.need_weights --threads 1 --patterns both | tee benchmarks/results/need_weights.md

bench-memory: $(STAMP)
	$(PY) -m benchmarks.memory --threads 1 | tee benchmarks/results/memory.md

# one decoding step of the sparse family and softmax against fairseq's attention (self and cross, beam 5; ~10 s)
bench-decoding: $(STAMP)
	$(PY) -m benchmarks.decoding softmax sparsemax entmax15 alpha_entmax --positions 16,64,256 --rounds 10 \
		--steps 30 | tee benchmarks/results/decoding.md

# the causal efficient attentions' time bounds, each timed in turn with the projections-only step (~1 min)
bench-paired: $(STAMP)
	$(PY) -m benchmarks.paired abc cosformer local longshort performer s4d --pattern causal --length 8192 \
		--rounds 12 | tee benchmarks/results/paired_causal_8192.md

# where the registries are reachable: the wheels a GPU machine lacks (not torch), for its Python version;
# GPU_MACHINE=nvidia-h200 leaves out what that machine's image has (scripts/gpu_machines/NAME.txt): 22 MB, not 130
GPU_PYTHON_VERSION ?= 3.12
GPU_MACHINE ?=
gpu-wheels: $(STAMP)
	$(PY) scripts/gpu_wheels.py --python-version $(GPU_PYTHON_VERSION) --dest gpu-wheels \
		$(if $(GPU_MACHINE),--machine-has scripts/gpu_machines/$(GPU_MACHINE).txt)

# on the GPU machine (offline, its own CUDA torch): install those wheels, run the CUDA tests and the device benchmark
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
