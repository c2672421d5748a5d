#!/usr/bin/env bash
# The side-by-side experiment of docs/results.md: the plain residual (baseline), dynamic
# hyper-connections (hc), static hyper-connections (hc_static) and mHC, same data, seed, steps
# and width, n = 4 streams; hc, mhc and the baseline again at a high learning rate to stress
# stability; more seeds for the main pair (baseline, mhc). Then tools/plot_runs.py draws every run.
#
#   tools/reproduce.sh [OUT]          # default OUT: runs/reproduce
#
# Every setting is an environment variable (defaults: a 2-core CPU machine, about 20 minutes):
#   NPROC=1 PP=1 TP=1           processes per run and their layout (world = PP * TP * data-parallel)
#   LAYERS=16 HIDDEN=64 FFN=256 HEADS=4 SEQ=64 MBS=4 GBS=8 ITERS=200 WARMUP=20
#   LR=3e-3 STRESS_LR=3e-2      learning rate of the main runs and of the stress pair
#   SEEDS="1 2"                 seeds of the main pair; the other runs use the first
#   LOG_INTERVAL=5 EVAL_INTERVAL=50 EVAL_ITERS=4 SAVE_INTERVAL=ITERS/2
#   RUNS="..."                  a subset of the run names below, in that order
#   EXTRA_ARGS="..."            more flags for every run (e.g. --bf16, --transformer-impl ...)
#   OMP_NUM_THREADS=1           CPU threads per process
#   LAUNCHER="..."              the command that starts the processes of one run (default:
#                               torch.distributed.run with NPROC processes on this machine); for
#                               several nodes, e.g. "torchrun --nnodes 4 --nproc-per-node 8
#                               --rdzv-backend c10d --rdzv-endpoint HOST:29500", on every node
# A finished run is skipped when the script is run again (its `done` file); an interrupted one
# resumes from its last checkpoint. Wall times go to OUT/wall_times.tsv, figures to OUT/plots.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-runs/reproduce}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NPROC=${NPROC:-1} PP=${PP:-1} TP=${TP:-1}
LAYERS=${LAYERS:-16} HIDDEN=${HIDDEN:-64} FFN=${FFN:-256} HEADS=${HEADS:-4}
SEQ=${SEQ:-64} MBS=${MBS:-4} GBS=${GBS:-8} ITERS=${ITERS:-200} WARMUP=${WARMUP:-20}
LR=${LR:-3e-3} STRESS_LR=${STRESS_LR:-3e-2} SEEDS=${SEEDS:-"1 2"}
LOG_INTERVAL=${LOG_INTERVAL:-5} EVAL_INTERVAL=${EVAL_INTERVAL:-50} EVAL_ITERS=${EVAL_ITERS:-4}
SAVE_INTERVAL=${SAVE_INTERVAL:-$((ITERS / 2))}
EXTRA_ARGS=${EXTRA_ARGS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LAUNCHER=${LAUNCHER:-"$PYTHON -m torch.distributed.run --nproc-per-node $NPROC --master-port ${MASTER_PORT:-29531}"}

read -r -a SEED_LIST <<<"$SEEDS"
SEED=${SEED_LIST[0]}
# name, residual (baseline | mhc type), seed, learning rate
PLAN=("baseline_s$SEED baseline $SEED $LR" "mhc_s$SEED mhc $SEED $LR" "hc_s$SEED hc $SEED $LR"
    "hc_static_s$SEED hc_static $SEED $LR"
    "hc_s${SEED}_high_lr hc $SEED $STRESS_LR" "mhc_s${SEED}_high_lr mhc $SEED $STRESS_LR"
    "baseline_s${SEED}_high_lr baseline $SEED $STRESS_LR")
for extra_seed in "${SEED_LIST[@]:1}"; do
    PLAN+=("baseline_s$extra_seed baseline $extra_seed $LR" "mhc_s$extra_seed mhc $extra_seed $LR")
done
RUNS=${RUNS:-$(for entry in "${PLAN[@]}"; do echo "${entry%% *}"; done)}

mkdir -p "$OUT"
[ -f "$OUT/wall_times.tsv" ] || printf 'run\tseconds\tstatus\n' >"$OUT/wall_times.tsv"
for entry in "${PLAN[@]}"; do
    read -r name residual seed lr <<<"$entry"
    grep -qxw -- "$name" <<<"$(tr ' ' '\n' <<<"$RUNS")" || continue
    dir=$OUT/$name
    if [ -f "$dir/done" ]; then
        echo "reproduce: $name already done, skipped"
        continue
    fi
    if [ "$residual" = baseline ]; then
        residual_flags=(--config configs/gpt_tiny_baseline.yaml)
    else
        residual_flags=(--config configs/gpt_tiny_mhc.yaml --mhc-type "$residual")
    fi
    mkdir -p "$dir"
    echo "reproduce: $name ($residual, seed $seed, lr $lr) -> $dir/log.txt"
    started=$(date +%s)
    # shellcheck disable=SC2086  # LAUNCHER and EXTRA_ARGS are lists of words
    $LAUNCHER pretrain_gpt_mhc.py "${residual_flags[@]}" \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
        --num-layers "$LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" \
        --num-attention-heads "$HEADS" --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
        --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
        --lr "$lr" --min-lr "$(awk "BEGIN {print $lr / 10}")" --lr-warmup-iters "$WARMUP" \
        --seed "$seed" --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" \
        --eval-iters "$EVAL_ITERS" --save-interval "$SAVE_INTERVAL" \
        --save "$dir/checkpoints" --load "$dir/checkpoints" --tensorboard-dir "$dir/tensorboard" \
        $EXTRA_ARGS >>"$dir/log.txt" 2>&1 && status=finished || status=failed
    # A failed run (a diverged one stops at its first NaN loss) is a result too: it is plotted.
    printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - started))" "$status" >>"$OUT/wall_times.tsv"
    echo "reproduce: $name $status"
    [ "$status" = failed ] || touch "$dir/done"
done

"$PYTHON" tools/plot_runs.py --out "$OUT/plots" "$OUT"/*/tensorboard
