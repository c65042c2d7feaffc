#!/usr/bin/env bash
# `make gpu-check`: proves the CUDA build on a GPU machine, in one go.
#   1. builds with `--features cuda` (toolkit from PyPI, scripts/cuda-deps.sh);
#   2. stops with one message and exit 1 when no GPU is found;
#   3. runs tests/device.rs on CUDA: the encoder against the PyTorch reference in f32
#      (≤ 2e-4) and bf16 (tolerance in the test), and device projection == FAISS Flat;
#   4. measures teacher forward and forward+backward (tokens/s, batch 32 and 256, f32 and
#      bf16) and projection (queries/s), with src/bin/augpro-gpu-check.rs;
#   5. runs `augment` on pipelines/smoke.toml twice per dtype (stage split; the same shards
#      run after run), and verifies the output;
#   6. writes bench/results-gpu.json and bench/results-gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="$AUGPRO_CUDA_TARGET_DIR"
bash scripts/cuda-deps.sh
cargo build --release --features cuda --bins
cargo test --release --features cuda --test device --no-run
bin="$CARGO_TARGET_DIR/release"

if ! probe=$("$bin/augpro-gpu-check" --probe 2>&1); then
  echo "gpu-check: no GPU found; the CUDA build is fine, but this machine cannot run it ($(echo "$probe" | tail -1))" >&2
  exit 1
fi

tmp=bench/tmp/gpu
rm -rf "$tmp"
mkdir -p "$tmp"
start=$(date +%s)

echo "== parity on CUDA"
AUGPRO_TEST_DEVICE=cuda AUGPRO_PARITY_OUT="$tmp/parity.json" \
  cargo test --release --features cuda --test device -- --test-threads=1 2>&1 | tee "$tmp/parity.log"

echo "== teacher and projection"
"$bin/augpro-gpu-check" --device cuda --out "$tmp/measure.json"

echo "== augment (smoke)"
"$bin/augpro" -q augment pipelines/smoke.toml --device cuda --teacher-only >/dev/null
for dtype in f32 bf16; do
  for run in 1 2; do
    out="$tmp/out-$dtype-$run"
    t0=$(date +%s%N)
    "$bin/augpro" -q augment pipelines/smoke.toml --device cuda --dtype "$dtype" --out "$out" --force >/dev/null
    t1=$(date +%s%N)
    echo "$dtype $run $(((t1 - t0) / 1000000))" >>"$tmp/augment-times.txt"
    "$bin/augpro" verify "$out/sst2/smoke" >"$tmp/verify-$dtype-$run.txt"
  done
done

python3 - "$tmp" "$(($(date +%s) - start))" <<'EOF'
import json, sys, pathlib
tmp, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
parity = json.loads((tmp / "parity.json").read_text())
measure = json.loads((tmp / "measure.json").read_text())
runs = {}
for line in (tmp / "augment-times.txt").read_text().split("\n"):
    if not line.strip():
        continue
    dtype, run, ms = line.split()
    d = tmp / f"out-{dtype}-{run}" / "sst2" / "smoke"
    m = json.loads((d / "manifest.json").read_text())
    stages = {}
    for t in json.loads((d / "timings.json").read_text()).values():
        for k, v in t.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    runs.setdefault(dtype, []).append({
        "run": int(run), "wall_s": int(ms) / 1000, "rows": m["rows"],
        "shard_sha256": [s["sha256"] for s in m["shards"]],
        "stage_seconds": stages,
        "teacher_device": m["teacher"].get("device"), "teacher_dtype": m["teacher"].get("dtype"),
    })
augment = {}
for dtype, rs in runs.items():
    augment[dtype] = {"runs": rs, "same_shards_run_after_run": len({tuple(r["shard_sha256"]) for r in rs}) == 1}
result = {"device": measure["device"], "compute_capability": measure["compute_capability"],
          "parity": parity, "teacher": measure["teacher"], "projection": measure["projection"],
          "augment_smoke": augment, "gpu_check_seconds": seconds}
pathlib.Path("bench/results-gpu.json").write_text(json.dumps(result, indent=2) + "\n")

md = ["# augpro on a GPU", "", f"Device: {measure['device']}, compute capability {measure['compute_capability']}. "
      f"Written by `make gpu-check` ({seconds} s after the build).", "",
      "## Parity with the PyTorch reference (max |difference|, first 8 hidden values, every position)", "",
      "| dtype | measured | tolerance |", "|---|---:|---:|",
      f"| f32 | {parity['f32_max_abs_diff']:.2e} | {parity['f32_tolerance']:.0e} |",
      f"| bf16 | {parity['bf16_max_abs_diff']:.2e} | {parity['bf16_tolerance']} |", "",
      f"## Teacher (MiniLM-L6, {measure['teacher']['examples']} SST-2 train examples, {measure['teacher']['real_tokens']} real tokens)", "",
      "| dtype | batch | forward tokens/s | forward + backward tokens/s |", "|---|---:|---:|---:|"]
for r in measure["teacher"]["rows"]:
    md.append(f"| {r['dtype']} | {r['batch']} | {r['forward_tokens_per_s']:.0f} | {r['forward_backward_tokens_per_s']:.0f} |")
p = measure["projection"]
md += ["", "## Projection (exact nearest token, k = 1)", "",
       f"{p['table']}, {p['indexed_tokens']} indexed tokens: **{p['device_queries_per_s']:.0f} queries/s** on the device "
       f"(matmul + argmin) against {p['faiss_flat_host_queries_per_s']:.0f} queries/s for FAISS Flat on the host; "
       f"ids equal to FAISS: {p['ids_equal_to_faiss']}.", "",
       "## `augment` on pipelines/smoke.toml (64 examples, every method)", "",
       "| dtype | run | wall s | rows | same shards as run 1 |", "|---|---:|---:|---:|---|"]
for dtype, a in augment.items():
    for r in a["runs"]:
        md.append(f"| {dtype} | {r['run']} | {r['wall_s']:.1f} | {r['rows']} | {'yes' if r['shard_sha256'] == a['runs'][0]['shard_sha256'] else 'NO'} |")
md += ["", "Stage split (seconds, first run of each dtype):", "", "| dtype | " + " | ".join(sorted(augment[next(iter(augment))]["runs"][0]["stage_seconds"])) + " |"]
keys = sorted(augment[next(iter(augment))]["runs"][0]["stage_seconds"])
md.append("|---|" + "---:|" * len(keys))
for dtype, a in augment.items():
    st = a["runs"][0]["stage_seconds"]
    md.append(f"| {dtype} | " + " | ".join(f"{st.get(k, 0):.2f}" for k in keys) + " |")
pathlib.Path("bench/results-gpu.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
echo "gpu-check: wrote bench/results-gpu.json and bench/results-gpu.md"
