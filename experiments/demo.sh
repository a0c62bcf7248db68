#!/usr/bin/env bash
# The paper in miniature on a CPU: task -> teacher -> rollouts -> PIPO-SFT -> PIPO+OPD -> evaluation -> report.
#
#   bash experiments/demo.sh [WORKDIR]            # default runs/demo
#
# Every stage is one `python -m pipo_jax.X --flagfile=experiments/demo/X.flags` command (paths re-pointed at
# WORKDIR by the overrides below), so any stage can be rerun alone. A stage whose output exists is skipped
# (delete its directory to redo it). Stage timings go to WORKDIR/timings.json and into the report.
# Outputs: WORKDIR/report.md (targets met / missed, diagnosis, tables), WORKDIR/report.json, WORKDIR/sweep.png
# (threshold sweep), WORKDIR/budget.png (accuracy vs slot budget).
#
# Environment: PYTHON (default python); PIPO_DEMO_SMOKE=1 shrinks every stage to a few steps / questions (the
# test suite's smoke run: checks the plumbing, not the numbers); PIPO_DEMO_TAUS overrides the sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/demo}
PY=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
F=experiments/demo
D=$W/data
TOK=$D/tokenizer
# Up to 0.999999: this student's confidences sit close to 1, and the sweep must reach PAD ratios >= 0.6.
TAUS=${PIPO_DEMO_TAUS:--1,0.5,0.9,0.95,0.99,0.999,0.9999,0.99999,0.999999,1}
mkdir -p "$W/eval" "$W/logs"

# Size knobs: the defaults are the flagfiles'; the smoke run overrides them.
TASK_X=() TEACH_X=() ROLL_X=() SFT_X=() OPD_X=() EVAL_X=() SPEED_X=() DIAG_X=()
SFT_DATA=$W/rollout/sft.jsonl  # the teacher's correct rollouts
if [ "${PIPO_DEMO_SMOKE:-0}" = 1 ]; then
  TASK_X=(--n_train=64 --n_opd=8 --n_test=3)
  TEACH_X=(--config.train.num_steps=2 --config.data.batch_size=4 --config.train.log_every=1)
  ROLL_X=(--n=2 --max_new_tokens=8 --batch_size=8 --min_pass_rate=0)
  SFT_X=(--config.train.num_steps=2 --config.data.batch_size=4 --config.train.log_every=1)
  OPD_X=(--config.train.num_steps=2 --config.data.batch_size=2 --config.train.log_every=1
         --config.opd.max_new_tokens=8 --config.opd.min_pass_rate=0)
  EVAL_X=(--k=2 --max_new_tokens=8 --batch_size=8)
  SPEED_X=(--k=1 --repeats=2 --max_new_tokens=8 --batch_size=8)
  DIAG_X=(--max_examples=4 --batch_size=4)
  SFT_DATA=$D/train.jsonl  # a 2-step teacher answers nothing correctly: the smoke SFT uses the reference solutions
fi

T0=$(date +%s)
[ -f "$W/timings.json" ] || echo "{}" > "$W/timings.json"
stage() {  # stage NAME OUTPUT_MARKER CMD...: run unless OUTPUT_MARKER exists; record and print the wall time
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "== [$name] skipped ($marker exists)"; return; fi
  echo "== [$name] $*"
  local t=$(date +%s)
  set +e  # the filter may match nothing; the stage's own exit status is what counts
  "$@" 2>&1 | tee "$W/logs/$name.log" \
    | grep -E "^\[|^== |step ([0-9]*(00|25|50|75)|1)/|Error"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then echo "== [$name] FAILED (exit $rc); log: $W/logs/$name.log"; exit "$rc"; fi
  local dt=$(( $(date +%s) - t ))
  $PY - "$W/timings.json" "$name" "$dt" <<'EOF'
import json, sys
path, name, dt = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(path)); d[name] = dt; json.dump(d, open(path, "w"), indent=2)
EOF
  echo "== [$name] done in ${dt}s (total $(( $(date +%s) - T0 ))s)"
}

stage make_task "$D/train.jsonl" \
  $PY -m pipo_jax.make_task --flagfile=$F/make_task.flags --out_dir="$D" "${TASK_X[@]}"
stage teacher "$W/teacher/.done" bash -c "$PY -m pipo_jax.train --flagfile=$F/teacher.flags \
  --config.workdir=$W/teacher --config.data.train_path=$D/train.jsonl --config.data.tokenizer_path=$TOK \
  ${TEACH_X[*]} && touch $W/teacher/.done"
stage rollout "$W/rollout/opd.jsonl" \
  $PY -m pipo_jax.rollout --flagfile=$F/rollout.flags --checkpoint="$W/teacher" --tokenizer="$TOK" \
  --prompts="$D/opd.jsonl" --output_sft="$W/rollout/sft.jsonl" --output_opd="$W/rollout/opd.jsonl" "${ROLL_X[@]}"
# How hard each token is to draft (the teacher's native MTP head): SFT leans its gate PADs towards those tokens.
stage difficulty "$W/rollout/sft_difficulty.jsonl" \
  $PY -m pipo_jax.draft_difficulty --teacher="$W/teacher" --tokenizer="$TOK" --data="$SFT_DATA" \
  --output="$W/rollout/sft_difficulty.jsonl"
stage sft "$W/sft/.done" bash -c "$PY -m pipo_jax.train --flagfile=$F/sft.flags \
  --config.workdir=$W/sft --config.checkpoint.init_from=$W/teacher \
  --config.data.train_path=$W/rollout/sft_difficulty.jsonl \
  --config.data.tokenizer_path=$TOK ${SFT_X[*]} && touch $W/sft/.done"
stage opd "$W/opd/.done" bash -c "$PY -m pipo_jax.train --flagfile=$F/opd.flags \
  --config.workdir=$W/opd --config.checkpoint.init_from=$W/sft --config.opd.teacher_checkpoint=$W/teacher \
  --config.data.train_path=$W/rollout/opd.jsonl --config.data.tokenizer_path=$TOK ${OPD_X[*]} \
  && touch $W/opd/.done"

EV=($PY -m pipo_jax.evaluate --flagfile=$F/evaluate.flags --tokenizer="$TOK" --benchmark="$D/test.jsonl" "${EVAL_X[@]}")
stage eval_teacher "$W/eval/teacher.json" "${EV[@]}" --checkpoint="$W/teacher" --decode=ar,mtp,mtp_spec \
  --method=Regular,MTP,MTP-spec --output="$W/eval/teacher.json"
stage eval_sft "$W/eval/sft.json" "${EV[@]}" --checkpoint="$W/sft" --decode=pipo --conf_threshold=0.95 \
  --method=PIPO-SFT --output="$W/eval/sft.json"
# Accuracy against the training budget: every SFT checkpoint at tau 0.95 (report: accuracy vs demo minutes).
eval_sft_steps() {
  local rows=() c n
  for c in $(ls -dv "$W"/sft/checkpoints/[0-9]*); do
    n=$(basename "$c")
    "${EV[@]}" --checkpoint="$c" --decode=pipo --conf_threshold=0.95 --method="PIPO-SFT step $n" \
      --output="$W/eval/sft_step_$n.json" || return 1
    rows+=("$W/eval/sft_step_$n.json")
  done
  $PY -c "import json, sys; json.dump(sum((json.load(open(p)) for p in sys.argv[2:]), []), open(sys.argv[1], 'w'))" \
    "$W/eval/sft_steps.json" "${rows[@]}"
}
stage eval_sft_steps "$W/eval/sft_steps.json" eval_sft_steps
stage eval_opd "$W/eval/opd.json" "${EV[@]}" --checkpoint="$W/opd" --decode=pipo --conf_threshold="$TAUS" \
  --method=PIPO+OPD --random_pad_control --output="$W/eval/opd.json"
# Speed-ups with their spread: every method timed in turn, several rounds, one process (pipo_jax/speed.py).
stage speed "$W/eval/speed.json" $PY -m pipo_jax.speed --flagfile=$F/speed.flags --tokenizer="$TOK" \
  --benchmark="$D/test.jsonl" --run="Regular=$W/teacher:ar" --run="MTP=$W/teacher:mtp" \
  --run="MTP-spec=$W/teacher:mtp_spec" --run="PIPO-SFT=$W/sft:pipo@0.95" --run="PIPO+OPD=$W/opd:pipo@0.95" \
  --output="$W/eval/speed.json" "${SPEED_X[@]}"
# Diagnosis: teacher-forced accuracy by token class for the SFT checkpoints (the learning curve) and OPD.
STUDENTS=$(ls -dv "$W"/sft/checkpoints/[0-9]* | sed 's/$/,/' | tr -d '\n')$W/opd
stage diagnose "$W/eval/diagnosis.json" $PY -m pipo_jax.diagnose --teacher="$W/teacher" --student="$STUDENTS" \
  --data="$D/test_sft.jsonl" --tokenizer="$TOK" --output="$W/eval/diagnosis.json" "${DIAG_X[@]}"
ROWS=$W/eval/teacher.json,$W/eval/sft.json,$W/eval/opd.json
$PY - "$W/timings.json" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1])); d["total_this_invocation"] = int(sys.argv[2]); json.dump(d, open(sys.argv[1], "w"), indent=2)
EOF
$PY -m pipo_jax.make_report --rows="$ROWS" --run_dir="$W" --title="PIPO CPU miniature (experiments/demo.sh)" \
  --speed="$W/eval/speed.json" --targets_tau=0.95 --diagnosis="$W/eval/diagnosis.json" \
  --step_rows="$W/eval/sft_steps.json" --timings="$W/timings.json" \
  --extra_json="$W/timings.json,$D/task.json,$W/rollout/rollout_summary.json"
echo "== report: $W/report.md ($(( $(date +%s) - T0 ))s in all)"
cat "$W/report.md"
