#!/usr/bin/env bash
# One call on a GPU machine: the benchmark suite, the roofline cost model beside it, and the six probes of issue 20.
#
#   on this machine, once:  rm -rf gpu-checks && cp -r ../shared/gpu-checks gpu-checks     (git-ignored: .gitignore)
#   on the device:          bash benchmarks/gpu_session.sh        (device tool: carry ["gpu-checks"], timeout_s 600)
#
# Writes under $OUT at most 5 files (the device tool returns at most 8, two folders deep): session.log (everything
# printed), summary.md (the suite's), cost_model.md (predicted beside measured, committed constants), checks.log
# (the six probes' output) and results.tar.gz (every file: the suite's JSON, summaries, cost model with and without a
# refit, run_all.log, one log per probe). Copy results.tar.gz's suite/ into benchmarks/results/gpu_<device>_<date>/.
#
# Budget, so that the call ends inside the device tool's 600 s per command: SUITE_BUDGET_S (default 330) for
# run_all.py (which keeps inside it), then each probe gets CHECK_TIMEOUT_S (default 40) seconds while less than
# SESSION_S (default 570) have passed; a probe that has no time left is recorded as skipped. The probes print JSON
# lines as they go, so a probe cut short keeps what it printed.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-session-out}"
SUITE_BUDGET_S="${SUITE_BUDGET_S:-330}"
CHECK_TIMEOUT_S="${CHECK_TIMEOUT_S:-40}"
SESSION_S="${SESSION_S:-570}"
SUITE_ARGS="${SUITE_ARGS:-}"          # e.g. "--sizes tiny --parts vit" for a dry run of the plumbing on CPU
CHECKS_LIST="check_vit_executors check_lm_decode check_paper_decoders check_vit_static check_train check_gated_kernel"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
mkdir -p "$WORK/suite" "$WORK/checks"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
quiet() { grep -v -E "backend 'tpu'|InitGoogle|libtpu" || true; }

{
  echo "== session $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | quiet

  echo "== suite: run_all.py --budget-s $SUITE_BUDGET_S"
  # shellcheck disable=SC2086
  python3 benchmarks/run_all.py --out "$WORK/suite" --budget-s "$SUITE_BUDGET_S" --peak-tflops 989 $SUITE_ARGS 2>&1 \
    | quiet | tee "$WORK/suite/run_all.log"

  echo "== roofline cost model beside the run ($(elapsed)s)"
  python3 benchmarks/roofline.py "$WORK/suite" > "$WORK/suite/roofline.log" 2>&1 \
    && grep -m1 -A1 "^Error" "$WORK/suite/cost_model.md" || tail -3 "$WORK/suite/roofline.log"
  python3 benchmarks/roofline.py "$WORK/suite" --fit --print > "$WORK/suite/cost_model_refit.md" 2>&1 \
    && grep -m1 "^Cost model" "$WORK/suite/cost_model_refit.md" | cut -c1-300 || tail -3 "$WORK/suite/cost_model_refit.md"

  if [ -d gpu-checks ]; then
    for c in $CHECKS_LIST; do
      left=$(( SESSION_S - $(elapsed) ))
      t=$(( left < CHECK_TIMEOUT_S ? left : CHECK_TIMEOUT_S ))
      if [ ! -f "gpu-checks/$c.py" ] || (( t < 15 )); then
        echo "== $c: skipped ($( [ -f "gpu-checks/$c.py" ] && echo "${left}s of the session left" || echo "not carried"))"
        continue
      fi
      echo "== $c (timeout ${t}s, at $(elapsed)s)"
      EEJAX_CHECKOUT="$PWD" timeout "$t" python3 "gpu-checks/$c.py" 2>&1 | quiet | tee "$WORK/checks/$c.log"
    done
  else
    echo "== gpu-checks/: not carried (copy ../shared/gpu-checks to gpu-checks/ and name it in carry)"
  fi
  echo "== session done in $(elapsed)s"
} 2>&1 | tee "$OUT/session.log"

cp "$WORK/suite/summary.md" "$OUT/summary.md" 2>/dev/null
cp "$WORK/suite/cost_model.md" "$OUT/cost_model.md" 2>/dev/null
cat "$WORK"/checks/*.log > "$OUT/checks.log" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK" suite checks
ls -la "$OUT"
