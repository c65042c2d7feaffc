#!/usr/bin/env bash
# Scale-out on a live single-node Slurm cluster (started and stopped here):
#  1. `augpro slurm submit` of the smoke pipeline with 4 shards runs teacher → array →
#     finalize; the result is byte-identical to a single-process run.
#  2. One array task is cancelled before it can run (the partition is down while the chain
#     is submitted, so no shard can finish first: the test cannot race); finalize never
#     runs; resubmitting runs only the missing shard and the result is again identical.
#     (SIGTERM of a running shard is tested in tests/reliability.rs.)
#  3. Resubmitting a complete output submits nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${AUGPRO_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/augpro}
export AUGPRO_SLURM_DIR=${AUGPRO_SLURM_DIR:-/tmp/augpro-slurm-test}
export SLURM_CONF=$AUGPRO_SLURM_DIR/slurm.conf
W=$(mktemp -d /tmp/augpro-slurm-work.XXXXXX)
cleanup() {
  "$ROOT/tests/slurm/cluster.sh" stop || true
  rm -rf "$W"
}
trap cleanup EXIT
"$ROOT/tests/slurm/cluster.sh" start
cd "$ROOT"
SET="teacher.cache_dir=$W/teachers"
submit() { "$BIN" slurm submit pipelines/smoke.toml --shards 4 --set "$SET" "$@"; }
fail() { echo "slurm test FAILED: $*" >&2; squeue >&2 || true; exit 1; }
ids_of() { sed -n 's/^watch: *squeue -j //p' <<<"$1"; }
job_of() { sed -n "s/^submitted:.*$2 \([0-9]*\).*/\1/p" <<<"$1"; }
wait_jobs() {
  for _ in $(seq 900); do
    [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && return 0
    sleep 1
  done
  fail "jobs $1 still queued after 900 s"
}
state() { { scontrol show job "$1" 2>/dev/null || true; } | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -1; }
listing() { (cd "$1" && find . -type f ! -path './slurm/*' | grep -v timing | sort); }
same() {
  [ "$(listing "$1")" = "$(listing "$2")" ] || fail "file sets differ: $1 vs $2"
  for f in $(listing "$1"); do cmp -s "$1/$f" "$2/$f" || fail "$f differs between $1 and $2"; done
}

echo "== 1. chain: teacher → shards 0-3 → finalize"
out=$(submit --out "$W/a"); echo "$out"
grep -q "^submitted: teacher [0-9]*, shards [0-9]*, finalize [0-9]*$" <<<"$out" || fail "expected a three-stage chain"
wait_jobs "$(ids_of "$out")"
[ "$(state "$(job_of "$out" finalize)")" = COMPLETED ] || fail "finalize did not complete: $(state "$(job_of "$out" finalize)")"
grep -q ": ok$" "$W"/a/sst2/smoke/slurm/finalize-*.out || fail "finalize did not verify the shards"
"$BIN" -q augment pipelines/smoke.toml --num-shards 4 --out "$W/single" --set "$SET" >/dev/null
same "$W/single/sst2/smoke" "$W/a/sst2/smoke"
echo "identical to a single-process run"

echo "== 2. fault: cancel an array task, then resubmit"
# DOWN: jobs are queued but none starts until the partition is up again.
scontrol update PartitionName=debug State=DOWN
out=$(submit --out "$W/b"); echo "$out"
grep -q "^submitted: shards [0-9]*, finalize [0-9]*$" <<<"$out" || fail "the teacher exists: expected no teacher stage"
arr=$(job_of "$out" shards)
if dup=$(submit --out "$W/b" 2>&1); then fail "a second submission while the chain is queued was accepted: $dup"; fi
grep -q "still queued or running" <<<"$dup" || fail "unexpected refusal: $dup"
echo "second submission refused while the chain runs"
task="${arr}_1"
[ "$(state "$task")" = PENDING ] || fail "$task should be pending: $(state "$task")"
scancel "$task"
# A pending task that is cancelled shows as CANCELLED, or has no record left at all.
for _ in $(seq 40); do
  st=$(state "$task"); [ "$st" = CANCELLED ] || [ -z "$st" ] && break; sleep 0.25
done
[ "$st" = CANCELLED ] || [ -z "$st" ] || fail "$task not cancelled: $st"
scontrol update PartitionName=debug State=UP
echo "cancelled $task before it ran"
wait_jobs "$(ids_of "$out")"
[ ! -f "$W/b/sst2/smoke/manifest.json" ] || fail "finalize ran although a shard was cancelled"
fin_state=$(state "$(job_of "$out" finalize)")
echo "finalize job: $fin_state"
[ "$fin_state" != COMPLETED ] || fail "finalize completed"
out=$(submit --out "$W/b"); echo "$out"
grep -q "already complete; submitting shards" <<<"$out" || fail "resubmission should run only the missing shards"
wait_jobs "$(ids_of "$out")"
same "$W/single/sst2/smoke" "$W/b/sst2/smoke"
if find "$W/b/sst2/smoke" -name '*.tmp-*' | grep -q .; then fail "temporary files left"; fi
echo "identical after cancel + resubmit"

echo "== 3. complete output: nothing to submit"
submit --out "$W/b" | grep -q "nothing to submit" || fail "a complete output was resubmitted"
echo "slurm test: ok"
