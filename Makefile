# minipeft — every command a user needs. `make install` then `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: any release >= 2.4. A wheel already on this machine (pip's find-links) is preferred,
# so no multi-GB CUDA build is downloaded where a local CPU wheel exists; otherwise PyPI.
# `--no-deps` there because the local folder holds only torch; the next pip call resolves the rest.
TORCH  ?= torch>=2.4

.PHONY: install test test-slow notebooks data finetune compare evaluate bench clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null \
	  || $(PY) -m pip install -q --no-index --no-deps "$(TORCH)" 2>/dev/null \
	  || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"   # also fills in torch's own dependencies
	$(PY) -m ipykernel install --user --name minipeft --display-name "minipeft" >/dev/null

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow
