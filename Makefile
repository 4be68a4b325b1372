# Two commands on a fresh machine (Debian/Ubuntu, or any OS with Python 3.10+):
#   make demo   set up, train SiamMM on Fashion-MNIST with the CPU default, then evaluate it
#   make test   set up, run the test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
RUN     ?= runs/cpu
FMNIST   = /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	@df -Pk . | awk 'NR==2 && $$4 < 8000000 {print "warning: " int($$4/1048576) " GiB free here; the environment takes about 6 GiB (PyTorch with its CUDA libraries)"}'
	$(BIN)/pip install --no-cache-dir -r requirements.txt
	touch $@

# Fashion-MNIST, the embedded default data set: Debian's package where apt exists.
# Elsewhere pass --download to train.py (torchvision fetches it; needs internet).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST)/train-images-idx3-ubyte ]; then :; \
	elif command -v apt-get >/dev/null; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	else echo "no apt-get: run train.py with --download (needs internet) or --data-dir"; fi

setup: $(VENV)/.installed data

demo: setup
	$(BIN)/python train.py --out-dir $(RUN)
	$(BIN)/python evaluate.py --checkpoint $(RUN)/checkpoint.pth

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
