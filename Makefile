# Quick start:  make convert   (set up, then python convert.py --rho 8)
#               make test      (set up, then the test suite)
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data convert test train benchmark

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
