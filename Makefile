# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each makes .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test venv data bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST offline from Debian's package when we can install it; otherwise torchvision downloads it.
data:
	@if [ ! -e $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get install -y -q dataset-fashion-mnist || echo "Fashion-MNIST: torchvision will download it"; \
	  else echo "Fashion-MNIST: torchvision will download it"; fi; \
	fi

demo: venv data
	$(BIN)/aigc-ray demo

test: venv data
	$(BIN)/pytest

bench: venv data
	$(BIN)/python bench/train_throughput.py --two-workers

clean:
	rm -rf runs .cache .pytest_cache
