# Two set-up commands, each working on a fresh machine that has only Python 3.11:
#   make book   build the static site (the main job)
#   make test   run the whole test suite (unit tests + nbval over every notebook)
# Others: make gpu-test (on a machine with CUDA), make bench, make registry.

PYTHON ?= python3
VENV   ?= .venv
# A CPU build of torch that lies on this project's machines; on your own machine with CUDA,
# run e.g. `make test TORCH_SPEC="torch>=2.3"` to keep the torch you have.
TORCH_SPEC ?= torch==2.13.0
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: book test gpu-test bench registry clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[book,test,official]" "$(TORCH_SPEC)"
	touch $(STAMP)

book: $(STAMP)
	$(PY) book/generate.py --check
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going --quiet
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile --nbval --nbval-sanitize-with sanitize.cfg \
		-p no:cacheprovider tests notebooks

gpu-test: $(STAMP)
	$(PY) -m pytest -m gpu -p no:cacheprovider tests

bench: $(STAMP)
	for f in bench/*.py; do $(PY) $$f || exit 1; done

registry: $(STAMP)
	$(PY) book/generate.py

clean:
	rm -rf _build
