#!/usr/bin/env bash
# Sizes a task's student budget on its dev split: plain KD (the `original` rows of the
# task's pipeline, 1,000 source examples) trained at each given configuration. Prints dev
# and validation per run and writes the table to reports/sizing/<task>.md (EXAMPLES=N for
# another number of source examples: reports/sizing/<task>-nN.md). Budgets are chosen by
# the dev column only; validation is shown, never used.
#
#   scripts/size-student.sh TASK "LAYERS LR STEPS SEED" ...
#   scripts/size-student.sh stsb "6 1e-4 300 0" "6 1e-4 300 1"
#
# Finished runs (out/<task>/size-student/) are reused. BIN overrides the augpro binary;
# THREADS limits its threads.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: scripts/size-student.sh TASK "LAYERS LR STEPS SEED" ...}
shift
[ $# -gt 0 ] || { echo "size-student: give at least one \"LAYERS LR STEPS SEED\"" >&2; exit 2; }
bin=${BIN:-${CARGO_TARGET_DIR:-target}/release/augpro}
pipe=pipelines/$task.toml
[ -f "$pipe" ] || { echo "$pipe: no pipeline for task $task" >&2; exit 2; }
examples=${EXAMPLES:-1000}
threads=()
[ -z "${THREADS:-}" ] || threads=(--threads "$THREADS")
table=reports/sizing/$task.md
[ "$examples" = 1000 ] || table=reports/sizing/$task-n$examples.md

# The pipeline without its methods: teacher, dev split and `original` rows only.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
awk '/^\[methods\./ { exit } { print }' "$pipe" > "$tmp/kd.toml"
"$bin" -q augment "$tmp/kd.toml" --set "name=size-kd-n$examples" --set "max_examples=$examples" "${threads[@]}"
shards=out/$task/size-kd-n$examples

runs=()
for c in "$@"; do
  read -r layers lr steps seed <<< "$c"
  [ -n "$seed" ] || { echo "size-student: \"$c\": expected LAYERS LR STEPS SEED" >&2; exit 2; }
  out=out/$task/size-student/n$examples-L$layers-lr$lr-s$steps-seed$seed
  if [ ! -f "$out/metrics.json" ]; then
    echo "size-student: $task, $layers layers, lr $lr, $steps steps, seed $seed" >&2
    "$bin" -q train-student --shards "$shards" --task "$task" --out "$out" --methods original \
      --layers "$layers" --lr "$lr" --max-steps "$steps" --seed "$seed" "${threads[@]}"
  fi
  runs+=("$layers $lr $steps $seed $out/metrics.json")
done

mkdir -p reports/sizing
cat > "$tmp/table.py" <<'PY'
import json, sys
task, examples, args = sys.argv[1:4]
metric = {"cola": "matthews", "mrpc": "acc_and_f1", "stsb": "pearson"}.get(task, "accuracy")
print(f"# {task}: student budget sized on dev (plain KD, {examples} source examples)\n")
env = "" if examples == "1000" else f"EXAMPLES={examples} "
print(f"Regenerate: `{env}scripts/size-student.sh {task} {args}`\n")
print(f"{metric} ×100. The dev column chooses; validation is shown, never used.\n")
print("| layers | lr | steps | seed | dev | validation | kept step | dev curve (step: dev) |")
print("|---:|---:|---:|---:|---:|---:|---:|---|")
for line in sys.stdin:
    layers, lr, steps, seed, path = line.split()
    m = json.load(open(path))
    dev = 100 * m["dev"][metric]
    val = 100 * next(iter(m["validation"].values()))[metric]
    curve = ", ".join("%d: %.1f" % (c["step"], 100 * c["value"]) for c in m["curve"])
    print(f"| {layers} | {lr} | {steps} | {seed} | {dev:.1f} | {val:.1f} | {m['best_step']} | {curve} |")
PY
printf '%s\n' "${runs[@]}" \
  | python3 "$tmp/table.py" "$task" "$examples" "$(printf '"%s" ' "$@" | sed 's/ $//')" \
  | tee "$table"
