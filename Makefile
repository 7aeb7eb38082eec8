# Set-up and the two main jobs. Everything installs into ./.venv.
#   make demo   install, then run the CPU demo pretraining on synthetic cells and draw
#               its curves (DEMO_DIR/training.html)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision wheels to install; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Package index for TORCH_SPEC; empty = PyPI, whose Linux x86-64 torch is the CUDA build and
# pulls several GB of nvidia-* libraries and triton. CPU-only machines:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
DEMO_DIR ?= runs/demo
# pytest-xdist worker processes for make test (0 = one process, no xdist).
TEST_WORKERS ?= 2

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/python -m dinov2_hier.train --config configs/demo.yaml --output-dir $(DEMO_DIR)
	$(VENV)/bin/python -m dinov2_hier.report $(DEMO_DIR)

test: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS)
