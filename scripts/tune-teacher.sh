#!/usr/bin/env bash
# Tunes a task's teacher recipe on its dev split: the base model fine-tuned on the train
# split minus dev (the pipeline's dev carving: 10%, at most 2,000 examples, seed 0) at each
# given epoch count and peak learning rate. Prints dev and validation per run and writes the
# table to reports/sizing/<task>-teacher.md. The recipe is chosen by the dev column only;
# validation is shown, never used.
#
#   scripts/tune-teacher.sh TASK "EPOCHS LR" ...
#   scripts/tune-teacher.sh cola "3 5e-5" "6 1e-4"
#
# Finished runs (out/<task>/tune-teacher/) are reused. BIN overrides the augpro binary;
# THREADS limits its threads.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: scripts/tune-teacher.sh TASK "EPOCHS LR" ...}
shift
[ $# -gt 0 ] || { echo "tune-teacher: give at least one \"EPOCHS LR\"" >&2; exit 2; }
bin=${BIN:-${CARGO_TARGET_DIR:-target}/release/augpro}
threads=()
[ -z "${THREADS:-}" ] || threads=(--threads "$THREADS")

runs=()
for c in "$@"; do
  read -r epochs lr <<< "$c"
  [ -n "$lr" ] || { echo "tune-teacher: \"$c\": expected EPOCHS LR" >&2; exit 2; }
  out=out/$task/tune-teacher/e$epochs-lr$lr
  if [ ! -f "$out/metrics.json" ]; then
    echo "tune-teacher: $task, $epochs epochs, lr $lr" >&2
    "$bin" -q teacher train --task "$task" --out "$out" --epochs "$epochs" --lr "$lr" "${threads[@]}"
  fi
  runs+=("$epochs $lr $out/metrics.json")
done

mkdir -p reports/sizing
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cat > "$tmp" <<'PY'
import json, math, sys
task, args = sys.argv[1:3]
metric = {"cola": "matthews", "mrpc": "acc_and_f1", "stsb": "pearson"}.get(task, "accuracy")
rows = []
for line in sys.stdin:
    epochs, lr, path = line.split()
    m = json.load(open(path))
    rows.append((epochs, lr, 100 * m["dev"][metric], 100 * next(iter(m["validation"].values()))[metric]))
devs = [r[2] for r in rows]
best = max((i for i, d in enumerate(devs) if not math.isnan(d)), key=lambda i: devs[i], default=None)
print(f"# {task}: teacher recipe tuned on dev\n")
print(f"Regenerate: `scripts/tune-teacher.sh {task} {args}`\n")
print(f"{metric} ×100 of the base model fine-tuned on train minus dev. The dev column chooses "
      "(marked ✓); validation is shown, never used.\n")
print("| epochs | lr | dev | validation | chosen |")
print("|---:|---:|---:|---:|:---:|")
for i, (epochs, lr, dev, val) in enumerate(rows):
    print(f"| {epochs} | {lr} | {dev:.1f} | {val:.1f} | {'✓' if i == best else ''} |")
PY
printf '%s\n' "${runs[@]}" \
  | python3 "$tmp" "$task" "$(printf '"%s" ' "$@" | sed 's/ $//')" \
  | tee "reports/sizing/$task-teacher.md"
