# fastfilm: the two commands a newcomer runs are `make train` and `make test`.
# Set-up is idempotent: the venv is (re)installed only when setup.py changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from pip's configured indexes (PyPI's Linux x86-64 wheels are CUDA builds; a machine with a local CPU
# wheel, like this project's CI, takes that): TORCH_INDEX=https://download.pytorch.org/whl/cpu forces the CPU
# build. With a GPU, e.g. `make TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu130 setup`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
SYNTH ?= data/synthetic
CACHE ?= data/cache/synthetic
CONFIG ?= configs/synthetic.json
# The `make train` set: CLEVR's layout, 11 families and answer balancing, made easier than CLEVR so that a small
# FiLM learns it in 10 CPU-minutes: 3–5 objects (CLEVR: 3–10) drawn twice as large (shape and material survive
# the 64-pixel cache), one attribute word per object description (CLEVR: up to 3), 4000 train images.
SYNTH_ARGS ?= --train-images 4000 --min-objects 3 --max-objects 5 --object-scale 2.0 --max-filters 1
# make test runs the tests in this many processes (pytest-xdist; one file per process at a time, so that a
# module's fixtures are built once): one per core up to 4. Each gets its share of the cores' threads (conftest.py).
# Files are handed out longest first (tests/conftest.py LONGEST_FIRST; --no-loadscope-reorder keeps that order:
# xdist's own puts the files with most tests first, which left single-test 2-rank launcher files running alone last).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST_ARGS ?=
# The demo's image size: `auto` (configs/synthetic.json) sizes it by a short speed probe of this CPU (`python -m
# fastfilm.auto demo`: 64, 48 or 32 px, the largest at which the 10 minutes see ~8 epochs; it prints what it chose
# and why); a number forces one; `config` (any other CONFIG) keeps the config's own.
IMAGE_SIZE ?= $(if $(filter configs/synthetic.json,$(CONFIG)),auto,config)
DEMO_SIZES ?= 64,48,32
export TRITON_INTERPRET ?= $(shell $(PYTHON) -c "import shutil,sys; sys.stdout.write('0' if shutil.which('nvidia-smi') else '1')")

STAMP := $(VENV)/.fastfilm-installed

.PHONY: setup train test test-kernels-as-gpu test-low-end aot-manifest gpu-wheels lint format data bench clean help
help:
	@echo "make train   set up .venv, generate the synthetic CLEVR-format set, train on it (DeepSpeed launcher)"
	@echo "make test    set up .venv, lint, run the test suite"
	@echo "make bench   run the benchmarks (pytest bench/)"

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev,analysis]'
	@# The lowest triton setup.py allows, beside the venv's own: `python -m kernels.aot` compiles the kernels with both
	@# (tests/kernels/test_aot.py); only that test puts it on PYTHONPATH.
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-3.6 triton==3.6.0
	@# (DeepSpeed's CPU init would JIT-build a shared-memory all-reduce op, ~1 min of C++, that only its inference
	@# uses: the trainer skips it, fastfilm/train.py skip_deepspeed_shm_op; nothing to build here.)
	@touch $(STAMP)

data: $(STAMP)
	@test -f $(SYNTH)/questions/CLEVR_train_questions.json && test "$$(cat $(SYNTH)/.synth-args 2>/dev/null)" = "$(SYNTH_ARGS)" \
	  || { $(VENV)/bin/fastfilm synth --out $(SYNTH) $(SYNTH_ARGS) && echo "$(SYNTH_ARGS)" > $(SYNTH)/.synth-args; }
	$(VENV)/bin/fastfilm prep --clevr $(SYNTH) --out $(CACHE) --image-size 64

train: data
	@size=$(IMAGE_SIZE); \
	if [ "$$size" = auto ]; then size=$$($(PY) -m fastfilm.auto demo --config $(CONFIG) --sizes $(DEMO_SIZES)) || exit 1; fi; \
	set=; if [ "$$size" != config ]; then set="--set model.image_size=$$size"; fi; \
	if [ "$$size" != config ] && [ "$$size" != 64 ]; then \
	  $(VENV)/bin/fastfilm prep --clevr $(SYNTH) --out $(CACHE) --image-size $$size || exit 1; fi; \
	echo "deepspeed --num_gpus 1 fastfilm/train.py --config $(CONFIG) $$set"; \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus 1 fastfilm/train.py --config $(CONFIG) $$set

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# the layers (README, "Layout"; contracts in pyproject.toml); tests/test_layers.py checks them too
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The benchmarks' quick shape-check (`pytest bench/ --bench-quick`: on a CPU its numbers are not timings) runs
# beside the tests at the lowest priority (nice 19): it takes the CPU time the tests leave idle (process
# start-ups, waits, the last file) instead of ~1.8 minutes of its own after them. Its report follows the tests'.
test: lint
	@log=$$(mktemp); \
	nice -n 19 $(PY) -m pytest -q -p no:cacheprovider bench/ --bench-quick > $$log 2>&1 & bench=$$!; \
	trap 'kill $$bench 2>/dev/null; rm -f $$log' INT TERM; \
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	wait $$bench; brc=$$?; \
	echo "--- pytest bench/ --bench-quick (ran beside the tests at nice 19; a shape-check, not timings) ---"; \
	cat $$log; rm -f $$log; \
	test $$rc -eq 0 -a $$brc -eq 0

# The kernel tests with the launchers choosing as on an sm_90 (132 SMs): the GPU's tiles, autotune candidates and
# splits, under the interpreter (kernels/README.md, "The CPU sees what the GPU does"); 4 min on 2 idle AVX2 cores.
test-kernels-as-gpu: $(STAMP)
	TRITON_INTERPRET=1 FASTFILM_KERNELS_AS_GPU=sm_90 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests/kernels \
	  --ignore tests/kernels/test_aot.py

# The low end of setup.py's range, the versions the GPU image has (torch 2.11.0, which pins triton 3.6.0): the whole
# suite in a side venv that holds only those (and their dependencies) and borrows every other package from .venv.
# Where only PyPI is reachable, torch 2.11 comes as its CUDA build (~4.6 GB; it runs on a CPU);
# LOW_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build. Then `pytest bench/ --bench-quick` (the
# GPU run's gpu_step.py and op cases, shape-checked). ~19 min on 2 AVX2-only cores, ~7 on 2 avx512 ones.
LOW_VENV ?= .venv-low
LOW_TORCH ?= torch==2.11.0
LOW_TORCH_INDEX ?=
test-low-end: $(STAMP)
	@test -x $(LOW_VENV)/bin/python || { $(PY) -m venv --without-pip $(LOW_VENV) && \
	  $(PY) -m pip --python $(LOW_VENV)/bin/python install -q $(LOW_TORCH) \
	    $(if $(LOW_TORCH_INDEX),--index-url $(LOW_TORCH_INDEX)); } || { rm -rf $(LOW_VENV); exit 1; }
	@# .venv's packages after the side venv's own; its scripts (deepspeed, lint-imports) run with the side python
	@$(LOW_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(LOW_VENV)/.purelib
	@echo "import site; site.addsitedir('$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
	  > $$(cat $(LOW_VENV)/.purelib)/zz_fastfilm_venv.pth
	@for s in deepspeed lint-imports; do \
	  sed "1s|.*|#!$(CURDIR)/$(LOW_VENV)/bin/python|" $(VENV)/bin/$$s > $(LOW_VENV)/bin/$$s && chmod +x $(LOW_VENV)/bin/$$s; done
	$(LOW_VENV)/bin/python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
	PATH=$(CURDIR)/$(LOW_VENV)/bin:$$PATH $(LOW_VENV)/bin/python -m pytest -q -n $(TEST_JOBS) --dist loadfile \
	  --no-loadscope-reorder $(PYTEST_ARGS)
	PATH=$(CURDIR)/$(LOW_VENV)/bin:$$PATH $(LOW_VENV)/bin/python -m pytest -q -p no:cacheprovider bench/ --bench-quick

# After changing a kernel: compile the whole AOT matrix (~950 variants, ~7 min on 2 AVX2 cores) and record it in
# the manifest that make test checks against (kernels/README.md, "The manifest"); commit it with the change.
aot-manifest: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m kernels.aot --sizes all --check --write-manifest kernels/aot_manifest.json

bench: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-json=bench/results.json

# For a lent GPU machine (no network; torch, triton, pytest there, not DeepSpeed): the venv's DeepSpeed as a wheel
# plus the dependencies that machine lacks, for its Python (GPU_PYTHON), in .whl/ (~5 MB; the device tool carries
# it: bench/README.md, "The next GPU session"). Built in a side folder and renamed, so a failed download leaves
# the old set whole.
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	rm -rf .whl.tmp && mkdir .whl.tmp
	$(PY) -m pip download -q --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl.tmp 'pydantic>=2,<3' hjson
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl.tmp \
	  deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
	rm -rf .whl && mv .whl.tmp .whl && ls -l .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
