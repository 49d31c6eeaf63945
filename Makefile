# Quick start:  make convert   (set up, then python convert.py --rho 8)
#               make test      (set up, then the test suite)
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data convert test train benchmark figures cifar10-offline

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Fashion-MNIST's four IDX files from Debian (TFDS builds the dataset from
# them offline; with internet TFDS would download them itself).
data:
	@test -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz || \
	  { $(SUDO) apt-get update -q && \
	    $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

setup: $(VENV)/.installed data

convert: setup
	$(PYTHON) convert.py --rho 8

train: setup
	$(PYTHON) train.py --workdir runs/fmnist

test: setup
	$(PYTHON) -m pytest -n 2 --dist loadfile -q tests

benchmark: setup
	$(PYTHON) benchmarks/snn_speed.py --batch 64 --rho 8 --T 8 --chunk_T 32 --time_chunks none,4,8,16
	$(PYTHON) benchmarks/train_throughput.py

# The README's figure (docs/figures/accuracy_latency.png) from the CIFAR-10
# ResNet-20 table of docs/results.md, kept in docs/figures/cifar10_resnet20.json.
figures: setup
	$(PYTHON) benchmarks/figures.py

# One-time: the real CIFAR-10 test set as the TFDS dataset cifar10_offline
# (8,000 train / 2,000 test, cos_jax/data/cifar10_offline.py), prepared in
# $TFDS_DATA_DIR or ~/tensorflow_datasets. Its source, the 358 MB bigbench 1.0.0
# sdist, is downloaded (never installed) into that dir's downloads/manual/
# (renamed there when complete, so an interrupted download is fetched again).
# pip 26.3 refuses to download this sdist (its metadata names a file:// URL
# dependency), so a pinned older pip in a throwaway venv fetches it.
C10_TFDS_DIR := $(or $(TFDS_DATA_DIR),$(HOME)/tensorflow_datasets)
C10_MANUAL := $(C10_TFDS_DIR)/downloads/manual
cifar10-offline: setup
	@test -f $(C10_MANUAL)/bigbench-1.0.0.tar.gz || test -f $(C10_MANUAL)/task.json || { \
	  mkdir -p $(C10_MANUAL) && \
	  tmp=$$(mktemp -d -p $(C10_TFDS_DIR)/downloads) && \
	  $(PY) -m venv $$tmp/venv && \
	  $$tmp/venv/bin/pip install -q pip==26.2 && \
	  { $$tmp/venv/bin/pip download -q --no-deps --no-binary :all: \
	      bigbench==1.0.0 -d $$tmp/sdist || { echo "make cifar10-offline: \
	error: the package index offers no bigbench 1.0.0 sdist (pypi.org listed \
	only 0.0.1 on 2026-12-05): put a copy of bigbench-1.0.0.tar.gz, or its \
	cifar10_classification task.json, in $(C10_MANUAL) and rerun" >&2; \
	      false; }; } && \
	  mv $$tmp/sdist/bigbench-1.0.0.tar.gz $(C10_MANUAL)/; \
	  status=$$?; rm -rf $$tmp; exit $$status; }
	TFDS_DATA_DIR=$(C10_TFDS_DIR) $(PYTHON) -c "from cos_jax.data import \
	  _tensorflow, prepare; _tensorflow.configure(); \
	  print(prepare.get_builder('cifar10_offline').info.splits)"
