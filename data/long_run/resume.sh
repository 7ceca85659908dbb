#!/usr/bin/env bash
# The course's long run (issue 28): 30,000 steps of the cpu recipe, carried across working periods.
# Resumes the run from data/long_run/state.pt on one thread, scores it at every 5,000 steps (DDIM-50 with
# eta = 0 and 1, n = 1000, into scores.jsonl; a 10x10 grid from fixed noise, grid_<step>.png) and stops
# as planned after MINUTES of wall time (default 120), leaving a state that the next period resumes:
#   setsid nohup data/long_run/resume.sh 150 >> data/long_run/log.txt 2>&1 &
# At step 30,000 it exports the EMA model to data/pretrained/fashion_mnist_ddpm.pt and scores it.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Where Linux groups processes by session (autogroup), nice alone does not protect this run from work
# started in another shell: raise its group's priority where that is allowed (measured on a 2-core CPU:
# 2.0-2.2 s per step beside other jobs without it, 1.0 s with it).
echo -10 2>/dev/null > /proc/self/autogroup || true
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
run=data/long_run
state=$run/state.pt
steps=30000
score_every=5000
score_minutes=20  # two evaluations and a grid, on one thread, with room to spare
deadline=$(($(date +%s) + 60 * ${1:-120}))

step_reached() { [ -f $state ] && python -c "import ddpm_helpers; print(ddpm_helpers.read_checkpoint('$state')['step'])" || echo 0; }
scored() { grep -qs "\"step\": $1," $run/scores.jsonl; }
score() {
  for eta in 0 1; do
    python ddpm_helpers.py evaluate --checkpoint $state --sampler ddim --steps 50 --eta $eta --num 1000 --seed 0 --scores $run/scores.jsonl
  done
  python ddpm_helpers.py sample --checkpoint $state --num 100 --sampler ddim --steps 50 --seed 0 --out $run/grid_$1.png
}

echo "== $(date -u +%FT%TZ): resuming at step $(step_reached), planned stop in ${1:-120} min"
while :; do
  step=$(step_reached)
  if ((step > 0 && step % score_every == 0)) && ! scored $step; then
    if (($(date +%s) + 60 * score_minutes > deadline)); then
      echo "== step $step is not scored yet and there is no time left: the next period scores it first"; exit 0
    fi
    score $step
  fi
  ((step < steps)) || { echo "== $(date -u +%FT%TZ): the run is complete"; exit 0; }
  minutes=$(((deadline - $(date +%s)) / 60))
  ((minutes > 0)) || { echo "== $(date -u +%FT%TZ): stopped as planned at step $step"; exit 0; }
  python ddpm_helpers.py train --recipe cpu --steps $steps --fp32 --resume-file $state \
    --out data/pretrained/fashion_mnist_ddpm.pt --stop-at $(((step / score_every + 1) * score_every)) --stop-after $minutes
done
