# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each makes .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test venv data bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python tools/install.py  # uv, configured as pip is: ~1 min for ~7 GB with bytecode, pip took ~2
	touch $(STAMP)

venv: $(STAMP)

# Debian packages: Fashion-MNIST offline (else torchvision downloads it) and Chromium for the browser
# test (else it is skipped). Installed when we are root or have sudo; never required.
APT_PKGS := dataset-fashion-mnist chromium
data:
	@missing=""; [ -e $(FASHION) ] || missing="dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    $$SUDO apt-get install -y -q $$missing || ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing) \
	      || echo "could not install $$missing: Fashion-MNIST comes from torchvision, the browser test is skipped"; \
	  fi; \
	fi

demo: venv data
	$(BIN)/aigc-ray demo

test: venv data
	$(BIN)/pytest

bench: venv data
	$(BIN)/python bench/train_throughput.py --two-workers

clean:
	rm -rf runs .cache .pytest_cache
