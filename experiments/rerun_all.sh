#!/usr/bin/env bash
# Regenerate results/*.json from a clean worktree of HEAD, one script at a time.
#
#   experiments/rerun_all.sh                  # everything (about 65 min on 2 quiet cores)
#   experiments/rerun_all.sh --cheap          # only the deterministic, timing-insensitive ones (about 11 min: bench_placer solves 1,024-device jobs with token origins)
#   experiments/rerun_all.sh fig_memory soak  # just these
#
# The code runs from `git worktree add $WT HEAD` (default /tmp/wt-rerun) with PYTHONPATH=$WT, so
# every file records HEAD's commit, clean; only committed work is measured. Outputs go to this
# checkout's results/ (and figures/). Scripts run one after another, cheap deterministic ones
# first, then the wall-clock ones, heaviest last: nothing else should load the machine while
# they run (their numbers are wall times on shared cores). Afterwards:
#   .venv/bin/python analysis/doc_claims.py --fix   # restate the docs' numbers from the new results
#   .venv/bin/python -m pytest tests/test_results_docs.py
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WT=${WT:-/tmp/wt-rerun}
PY=${PY:-$REPO/.venv/bin/python}

# name -> expected seconds on 2 quiet cores (from the last recorded runs)
declare -A SECONDS_EXPECTED=(
  [bench_sim_scale]=5 [fig_tp_mesh]=20 [bench_placer]=560 [eval_forecast]=35 [bench_shadows]=80 [bench_executor]=45 [bench_2bw]=25 [fig_2bw]=45 [fig_chimera]=90
  [fig_memory]=75 [fig_interleaved]=60 [fig_bubble]=125 [fig_zero_bubble]=155 [fig_capacity]=130 [fig_balance]=115
  [bench_moe_layer]=180 [bench_migration_memory]=120 [bench_runtime]=110 [bench_a2a]=45 [bench_sim]=285 [fig_placement]=380
  [soak]=1045 [bench_dynamic]=2400
)
CHEAP=(bench_sim_scale fig_tp_mesh bench_placer eval_forecast bench_shadows)  # simulation only: same numbers on any load (bench_placer's solve time, bench_shadows' decision time: CPU seconds)
TIMED=(bench_executor bench_2bw fig_2bw fig_chimera fig_memory fig_interleaved fig_bubble fig_zero_bubble fig_capacity fig_balance bench_moe_layer
       bench_migration_memory bench_runtime bench_a2a bench_sim fig_placement soak bench_dynamic)

if [[ ${1:-} == --cheap ]]; then
  NAMES=("${CHEAP[@]}")
elif [[ $# -gt 0 ]]; then
  NAMES=("$@")
else
  NAMES=("${CHEAP[@]}" "${TIMED[@]}")
fi

total=0
for n in "${NAMES[@]}"; do
  [[ -n ${SECONDS_EXPECTED[$n]:-} ]] || { echo "rerun_all: unknown script $n (known: ${!SECONDS_EXPECTED[*]})" >&2; exit 2; }
  total=$((total + SECONDS_EXPECTED[$n]))
done
echo "rerun_all: ${#NAMES[@]} scripts, expected $((total / 60)) min $((total % 60)) s on 2 quiet cores: ${NAMES[*]}"
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
  echo "rerun_all: note: $REPO has uncommitted changes; they are NOT in the run (HEAD is)" >&2
fi

git -C "$REPO" worktree remove --force "$WT" 2>/dev/null || true
git -C "$REPO" worktree add --detach "$WT" HEAD >/dev/null
trap 'git -C "$REPO" worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
commit=$(git -C "$WT" rev-parse HEAD)
echo "rerun_all: code from $WT at $commit, results into $REPO/results"

LOGS=${LOGS:-/tmp/rerun_logs}
mkdir -p "$REPO/results" "$LOGS"
start=$(date +%s)
for n in "${NAMES[@]}"; do
  t0=$(date +%s)
  echo "== $n (expected ~${SECONDS_EXPECTED[$n]} s; load $(cut -d' ' -f1-3 /proc/loadavg))"
  (cd "$WT" && PYTHONPATH="$WT" "$PY" "experiments/$n.py" --out "$REPO/results/$n.json" 2>&1 | tee "$LOGS/$n.log" | tail -n 5)
  echo "== $n done in $(( $(date +%s) - t0 )) s"
done
PYTHONPATH="$WT" "$PY" "$WT/analysis/make_figures.py" --results "$REPO/results" --figures "$REPO/figures" >/dev/null
echo "rerun_all: full output in $LOGS/"
echo "rerun_all: ${#NAMES[@]} scripts in $(( ($(date +%s) - start) / 60 )) min; figures redrawn into $REPO/figures"
echo "rerun_all: now restate the docs: $PY analysis/doc_claims.py --fix && $PY -m pytest -q tests/test_results_docs.py"
