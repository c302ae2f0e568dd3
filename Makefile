# mxtransfer: paths and targets only. Hyper-parameters live in the CLIs' defaults (train/config.py etc.).
#   make demo      the whole pipeline on the bundled default set and the open_nsfw Caffe model
#   make test      installs .venv and runs the test suite
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

.PHONY: install test test-fast demo rec convert train predict fetch-models bench bench-pack bench-convert \
        bench-train bench-scale check-gpu-install check-reports clean

install: $(STAMP)

$(STAMP): $(REQS) requirements-common.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -m pip show -q $(OTHER_MXNET) 2>/dev/null; then $(PY) -m pip uninstall -y -q $(OTHER_MXNET) mxnet; fi
	$(PY) -m pip install -q -r $(REQS)
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

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
