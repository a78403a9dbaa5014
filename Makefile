# The two commands of the README: `make demo` and `make test`. Each creates or reuses a virtual
# environment and installs only what is missing (a stamp file remembers the last install, so a
# second run goes straight to the work).
PYTHON ?= python3
VENV ?= .venv
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. 2.14.1 and
# torchvision 0.29.1 are the builds this project is tested with (open_clip needs torchvision).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.flamingo_dist-installed

.PHONY: demo-fewshot demo test test-fast lint install clean-demo system-deps bench-openflamingo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole story on CPU (or GPU), through the user's entry point: pretrain the tiny backbones
# (once, cached in data/backbones), generate the synthetic corpus (once), train the debug flavor
# with held-out attribute accuracy and the few-shot suite along the way, then write
# runs/demo/report.png and runs/demo/learning.json and print the table; fails when the model did
# not learn to read its images. Metrics also in runs/demo/mlflow.db
# ($(BIN)/mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db).
demo: $(STAMP)
	rm -rf runs/demo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/deepspeed flamingo_dist/train.py --deepspeed ds_configs/zero2.json \
		--config configs/demo.yaml
	$(BIN)/python tools/demo_report.py runs/demo --check

# The demo plus in-context learning (labels bound per prompt, 0 to 4 shots): docs/learning.md.
demo-fewshot: $(STAMP)
	rm -rf runs/demo-fewshot
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/deepspeed flamingo_dist/train.py --deepspeed ds_configs/zero2.json \
		--config configs/demo_fewshot.yaml
	$(BIN)/python tools/demo_report.py runs/demo-fewshot --check

# Debian packages the tests need beyond Python: java for pycocoevalcap's PTB tokenizer (CIDEr).
# (The SLURM cluster of tests/test_slurm_cluster.py installs its own packages: tests/slurm_cluster.py.)
system-deps:
	@command -v java >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends default-jre-headless; }

test: $(STAMP) system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The unit tests only (no multi-process run, no minutes-long training): about 2 minutes.
test-fast: $(STAMP) system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -ra -m "not multiprocess and not slow" $(PYTEST_ARGS)

# ruff: pyflakes, pycodestyle, bugbear, import order (settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf runs/debug runs/demo data/synthetic data/synthetic-demo data/backbones

# Training-step speed against OpenFlamingo on the same model, in one run (tools/bench_openflamingo.py).
# OpenFlamingo is not our dependency: it is installed (without its pinned dependencies) into
# .bench/openflamingo, beside the project's environment.
BENCH_OF := .bench/openflamingo
$(BENCH_OF)/open_flamingo: | $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(BENCH_OF) open-flamingo==2.0.1 einops einops-exts

bench-openflamingo: $(STAMP) $(BENCH_OF)/open_flamingo
	$(BIN)/python tools/bench_openflamingo.py --openflamingo $(BENCH_OF) --precision fp32 bf16 --pairs 5 \
		--out runs/bench-openflamingo.json
