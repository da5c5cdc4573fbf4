#!/bin/bash
# 1 vs 2 CPU processes, the same IPO run (global batch 4): pairs/s from the wall-time difference of a
# 4- and a 16-step run (the difference cancels start-up; it includes the 12 steps' reference log-probs).
# Both use the machine's cores: 1 process with OMP_NUM_THREADS=$CORES, 2 with CORES/2 each (accelerate's
# default). Usage: bench/train_processes.sh [WORKDIR]; PYTHON=... picks the interpreter.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
D=${1:-/tmp/fspo-bench-processes}
mkdir -p $D
[ -d $D/elix ] || $PY -m modeling.cli synth --domain elix --users 300 --pairs-per-user 10 --out $D/elix >/dev/null 2>&1
[ -f $D/base/fspo.json ] || $PY -m modeling.cli train --dataset $D/elix --out $D/base --stage pretrain --steps 2 --eval-episodes 4 >/dev/null 2>&1
CORES=${CORES:-$(nproc)}
declare -A one two
for steps in 4 16; do
  common="--dataset $D/elix --stage ipo --init $D/base --shots 4 4 --batch-size 4 --steps $steps --eval-every $steps --save-every 1000 --eval-episodes 4"
  rm -rf $D/one-$steps $D/two-$steps
  s=$(date +%s.%N); OMP_NUM_THREADS=$CORES $PY -m modeling.cli train $common --out $D/one-$steps >/dev/null 2>&1; e=$(date +%s.%N)
  one[$steps]=$(echo "$e - $s" | bc)
  echo "1 process,   $steps steps: ${one[$steps]} s (load average $(cut -d' ' -f1 /proc/loadavg))"
  s=$(date +%s.%N); $PY -m accelerate.commands.launch --config_file docs/configs/accelerate/cpu-2proc.yaml --num_cpu_threads_per_process $((CORES / 2)) --main_process_port 29655 -m modeling.cli train $common --out $D/two-$steps >/dev/null 2>&1; e=$(date +%s.%N)
  two[$steps]=$(echo "$e - $s" | bc)
  echo "2 processes, $steps steps: ${two[$steps]} s (load average $(cut -d' ' -f1 /proc/loadavg))"
done
echo "pairs/s: 1 process $(echo "scale=2; 48 / (${one[16]} - ${one[4]})" | bc), 2 processes $(echo "scale=2; 48 / (${two[16]} - ${two[4]})" | bc)"
