# minipeft — every command a user needs. `make install` then `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: any release >= 2.5 (SDPA enable_gqa; see pyproject.toml). A wheel already on this machine (pip's find-links) is preferred,
# so no multi-GB CUDA build is downloaded where a local CPU wheel exists; otherwise PyPI.
# `--no-deps` there because the local folder holds only torch; the next pip call resolves the rest.
TORCH  ?= torch>=2.5

.PHONY: install test test-slow notebooks grade data finetune resume compare evaluate bench gpu-check clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null \
	  || $(PY) -m pip install -q --no-index --no-deps "$(TORCH)" 2>/dev/null \
	  || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"   # also fills in torch's own dependencies
	$(PY) -m ipykernel install --sys-prefix --name minipeft --display-name "minipeft" \
	  --env OMP_NUM_THREADS 1 --env OMP_WAIT_POLICY PASSIVE >/dev/null   # this checkout's kernel (in .venv); the labs' tensors want one thread (docs/performance.md)

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

# ---------------------------------------------------------------- the main job
METHOD     ?= lora
CHECKPOINT ?=
ADAPTER    ?=
ARGS       ?=
RUN        ?=

TASK       ?=
TASK_DATA  := data/$(or $(TASK),gsm8k)

# TASK=gsm8k (default), mmlu, arc_challenge or dolly: download into data/$(TASK) (licences: data/README.md);
# ARGS="--source MIRROR" for a mirror or a local copy
data:
	$(if $(filter-out gsm8k,$(TASK)),$(PY) scripts/download_task.py --task $(TASK) --out data/$(TASK),\
	  $(PY) scripts/download_gsm8k.py --out data/gsm8k) $(ARGS)

# no CHECKPOINT: the shipped toy base on the task's toy analogue; with one: the task's files in data/$(TASK)
# NPROC=N: N processes on this machine under torchrun, one job (FSDP2; ARGS="--parallel ddp"): docs/distributed.md
NPROC ?= 1
finetune:
	$(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC),$(PY)) \
	  -m minipeft.finetune --method $(METHOD) $(if $(TASK),--task $(TASK)) $(if $(RUN),--out $(RUN)) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT) --data $(TASK_DATA)) $(ARGS)

# continue an interrupted run with its saved settings and state: make resume RUN=runs/toy/lora
resume:
	$(if $(RUN),,$(error make resume needs RUN=<run folder>, e.g. RUN=runs/toy/lora))
	$(PY) -m minipeft.finetune --resume $(RUN) $(ARGS)

evaluate:
	$(PY) -m minipeft.evaluate $(if $(TASK),--task $(TASK)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT) --data $(TASK_DATA)) \
	  $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

# every method + full + the claims' variants, 3 seeds, one epoch (see README); QUICK=1: one seed, 40 steps, minutes
QUICK ?=
compare:
	$(PY) -m minipeft.compare $(if $(TASK),--task $(TASK)) $(if $(QUICK),--quick) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT) \
	  --data $(TASK_DATA)) $(ARGS)

notebooks:  # every lab and every solution notebook (make test runs the labs; the solutions are marked slow)
	$(PY) -m pytest -q -m "" tests/test_notebooks.py

# a student's copy of a lab, run top to bottom and graded check by check: make grade NB=path/to/NN_name.ipynb
NB ?=
grade:
	$(if $(NB),,$(error give the notebook: make grade NB=notebooks/02_lora_learning_rate_of_B.ipynb))
	$(PY) -m minipeft.grade $(NB)

# optional: needs `$(PY) -m pip install -e ".[bench]"` (transformers + peft); never part of `make test`
bench:
	$(PY) bench/bench.py $(ARGS)

# on the lent GPU machine, with its system python3 (torch with CUDA there); installs and downloads nothing:
# preflight, the gpu tests, compare --throughput, bench.py, each in its own budget, <= 8 minutes (docs/gpu.md);
# figures in $(GPU_OUT)/gpu_check.json. PY=... for another interpreter
GPU_OUT ?= runs/gpu-check
gpu-check: PY = python3
gpu-check:
	$(PY) scripts/gpu_check.py --device cuda --out $(GPU_OUT) $(ARGS)

clean:
	rm -rf runs .pytest_cache
