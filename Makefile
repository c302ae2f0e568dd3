# mxtransfer: paths and targets only. Hyper-parameters live in the CLIs' defaults (train/config.py etc.).
#   make demo      the whole pipeline on the bundled default set and the open_nsfw Caffe model
#   make test      installs .venv and runs the test suite (Python 3.8 to 3.12; make install PYTHON=python3.12)
#   make test-py312  the whole suite on Python 3.12, in .venv-py312 (CI runs it too)
SHELL := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
GPU     ?=
PY      := $(VENV)/bin/python
# The CPU mxnet and mxnet-cu112 share the import name `mxnet`: never both in one venv, so switching a venv from one
# build to the other uninstalls the other first.
ifeq ($(GPU),cu112)
REQS := requirements-gpu.txt
STAMP := $(VENV)/.installed-cu112
OTHER_MXNET := mxnet
else
REQS := requirements.txt
STAMP := $(VENV)/.installed-cpu
OTHER_MXNET := mxnet-cu112
endif

# ---- make rec: im2rec-style lists, then packing -------------------------------------------------------
IMAGES      ?= demo/images
REC_PREFIX  ?= out/rec/demo
LIST_OPTS   ?= --recursive --train-ratio 0.8
PACK_OPTS   ?= --resize 224 --quality 95
# ---- make convert ------------------------------------------------------------------------------------
PROTOTXT     ?= .cache/models/nsfw/deploy.prototxt
CAFFEMODEL   ?= .cache/models/nsfw/resnet_50_1by2_nsfw.caffemodel
MODEL_PREFIX ?= out/model/nsfw
# open_nsfw expects BGR minus (104, 117, 123); --mean records it (in Caffe order) in the sidecar
CONVERT_OPTS ?= --verify --mean 104,117,123
# ---- make train / predict ----------------------------------------------------------------------------
TRAIN_REC    ?= $(REC_PREFIX)_train.rec
VAL_REC      ?= $(REC_PREFIX)_val.rec
TRAIN_PREFIX ?= out/train/finetuned
NUM_CLASSES  ?=
TRAIN_OPTS   ?=
EPOCH        ?= latest
PREDICT_IN   ?= $(VAL_REC)
PREDICT_CSV  ?= out/predict/predictions.csv
PREDICT_OPTS ?=
# ---- make demo ------------------------------------------------------------------------------------------
DEMO_OPTS    ?=

.PHONY: install install-in-place test test-fast test-py312 demo rec convert train predict fetch-models bench bench-pack bench-convert \
        bench-train bench-scale check-gpu-install check-reports clean

install: $(STAMP)

# mxnet 1.9.1 runs on Python 3.8 to 3.12 (3.12 with numpy 1.26: requirements-common.txt, symbols/mxnet_compat.py);
# numpy 1.x has no wheels for 3.13. Any other interpreter stops the install with one line, before a venv is made.
# (A recursive variable: the check runs only when an install is due.)
python_problem = $(shell py=$(PY); what=$(VENV); test -x $$py || { py=$(PYTHON); what="PYTHON=$(PYTHON)"; }; \
  if ! $$py -c 'import sys; sys.exit(not (3, 8) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then \
    found=$$($$py -c 'import platform; print("is Python " + platform.python_version())' 2>/dev/null || echo "is not a Python"); \
    command -v $$py >/dev/null || found="is not found"; \
    fix="make install PYTHON=python3.12 (or python3.8 ... python3.11; pyenv install 3.12 if you have none)"; \
    test "$$py" = $(PY) && fix="rm -rf $(VENV), then $$fix"; \
    echo "make install: $$what $$found; mxtransfer supports Python 3.8 to 3.12: $$fix"; fi)

$(STAMP): $(REQS) requirements-common.txt pyproject.toml Makefile
	$(if $(python_problem),$(error $(python_problem)))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -m pip show -q $(OTHER_MXNET) 2>/dev/null; then $(PY) -m pip uninstall -y -q $(OTHER_MXNET) mxnet; fi
	$(PY) -m pip install -q -r $(REQS)
	@$(MAKE) --no-print-directory install-in-place VENV=$(VENV)
	@rm -f $(VENV)/.installed-*
	@touch $@

# The project itself, in place: a .pth file puts this repository on the venv's sys.path, so `$(PY) -m train`
# (recbuild, tools.caffe_converter, ...) runs from any folder; rerun it after moving the repository. Not
# `pip install -e`: its default finder comes after the current folder's, so in a Kaggle folder `python -m train`
# would import the train/ image folder as a namespace package; a regular package on sys.path beats that (and the
# compat mode that does this is deprecated).
install-in-place:
	$(PY) -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/mxtransfer.pth", "w").write(sys.argv[1] + "\n")' $(CURDIR)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The whole suite on Python 3.12 in a venv of its own (numpy 1.26, numpy's aliases restored by
# symbols/mxnet_compat.py), as CI runs it after `make test`; PYTEST312='-m "not slow"' runs its fast part. PYTHON312:
# pyenv's newest 3.12, else a python3.12 on PATH that runs (pyenv's shim runs only when 3.12 is selected).
PYTHON312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null || echo $${PYENV_ROOT:-$$HOME/.pyenv})/versions/3.12*/bin/python3.12 2>/dev/null | \
                sort -rV) python3.12; do $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
VENV312   ?= .venv-py312
PYTEST312 ?=

test-py312:
	$(if $(PYTHON312),,$(error test-py312: no python3.12 found; pass PYTHON312=/path/to/python3.12 (pyenv install 3.12)))
	@$(MAKE) --no-print-directory install VENV=$(VENV312) PYTHON=$(PYTHON312)
	$(VENV312)/bin/python -m pytest -q $(PYTEST312) tests

rec: install
	$(PY) -m recbuild --list $(LIST_OPTS) $(REC_PREFIX) $(IMAGES)
	$(PY) -m recbuild $(PACK_OPTS) $(REC_PREFIX) $(IMAGES)

fetch-models: install
	$(PY) -m tools.fetch_models

convert: install
	$(PY) -m tools.caffe_converter $(CONVERT_OPTS) $(PROTOTXT) $(CAFFEMODEL) $(MODEL_PREFIX)

train: install
	$(PY) -m train --pretrained-model $(MODEL_PREFIX) --data-train $(TRAIN_REC) --data-val $(VAL_REC) \
	    --model-prefix $(TRAIN_PREFIX) $(if $(NUM_CLASSES),--num-classes $(NUM_CLASSES),) $(TRAIN_OPTS)

predict: install
	$(PY) -m train.predict $(TRAIN_PREFIX) $(EPOCH) $(PREDICT_IN) --out $(PREDICT_CSV) $(PREDICT_OPTS)

demo: install
	$(PY) -m tools.demo $(DEMO_OPTS)

bench: bench-pack bench-convert bench-train bench-scale

bench-pack: install
	$(PY) -m bench.pack

bench-convert: install
	$(PY) -m bench.convert

bench-train: install
	$(PY) -m bench.train

# python -m train against a stock Module.fit script at two dataset sizes 10x apart (whole processes)
bench-scale: install
	$(PY) -m bench.scale

# A GPU install is checked without a GPU: every library libmxnet.so links must resolve except the driver.
# It fails when libmxnet.so is missing, when any library but libcuda.so.1 is unresolved, or when the CUDA runtime
# does not come from the nvidia-*-cu11 wheels; the full ldd listing is kept in $(VENV)/ldd-libmxnet.txt.
check-gpu-install:
	$(MAKE) install GPU=cu112
	@set -e; lib=$$(echo $(VENV)/lib/python3*/site-packages/mxnet/libmxnet.so); \
	test -f "$$lib" || { echo "$$lib: not installed"; exit 1; }; \
	export VENV=$(VENV); source tools/gpu_env.sh; ldd "$$lib" > $(VENV)/ldd-libmxnet.txt; \
	grep -E "libcu|libnvrtc|libnccl|libnvToolsExt" $(VENV)/ldd-libmxnet.txt; \
	if grep "not found" $(VENV)/ldd-libmxnet.txt | grep -v "libcuda.so.1"; then echo "unresolved libraries above"; exit 1; fi; \
	grep -q "libcudart.so.11.0 => .*site-packages/nvidia/" $(VENV)/ldd-libmxnet.txt || { echo "libcudart.so.11.0 not from the nvidia wheels"; exit 1; }; \
	echo "all CUDA 11 libraries resolve (libcuda.so.1 comes with the driver)"

# The report pages render in headless Chromium with nothing missing: pages built from small generated data, plus
# PAGES="out/.../report.html ..." when given. Needs a Chromium (Debian: apt-get install -y chromium); fails without.
check-reports: install
	REPORTS_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q tests/test_reports_browser.py
	$(if $(PAGES),$(PY) -m tools.check_pages $(PAGES),)

clean:
	rm -rf out .pytest_cache
