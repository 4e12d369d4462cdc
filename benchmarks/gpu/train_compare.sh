# phikit's training step against a previous commit's and against Unsloth, in one device call, on the same random
# checkpoint per shape (train_speed.build_random) and the same batch. Each side runs in a process of its own.
#   run: bash benchmarks/gpu/train_compare.sh [mini] [phi4] [test]      carry: .pk .carry/old
#   PREBUILD=phi-4 with `test`: that shape's checkpoint is built while the tests run, for a later call on the warm machine
#   .pk        ../shared/peers/build_h200_pack.sh's packs (bitsandbytes + liger-kernel; Unsloth) and unsloth_train.py
#   .carry/old the previous commit's code: git archive HEAD src benchmarks | tar -x -C .carry/old
# Rows (train_speed's fields, plus "side": new | old | unsloth) go to $OUT/train_compare.jsonl, in the order old, new,
# new-fp8, new-llama, unsloth.
# STEPS / WARMUP: timed and untimed steps of each side [8 / 2]; IMPL: the phikit variant of train_speed.py [phikit];
# LLAMAFY=1: also the new side on the checkpoint converted to the Llama layout (issue 24), side new-llama (built
# beside the checkpoint, PREBUILD included); UNFUSED=1 with it: also side new-llama-unfused (train_speed's
# phikit-unfused: each split projection its own product).
# ARGS: more train_speed.py flags for phikit's sides (--profile: one more step's top kernels in each row).
# REPEAT: how many rounds of the sides run on one built checkpoint [1] (rows carry "round").
# SIDES: which of old, new, unsloth run [all three]. FP8=1: also the new side with the base's products in FP8
# (train_speed's phikit-fp8 variant, issue 23), side new-fp8.
# `curve` (Phi-4-mini): instead of speed, the loss curves of phikit and phikit-fp8 over CURVE steps [200] of fresh
# batches from train_speed's Markov source (--data markov), sides curve-phikit and curve-fp8.
set -o pipefail
if [ ! -e /tmp/uns/.done ]; then
  mkdir -p /tmp/bnb /tmp/uns
  tar -xJf .pk/bnb.tar.xz -C /tmp/bnb && tar -xJf .pk/unsloth.tar.xz -C /tmp/uns && touch /tmp/uns/.done || exit 1
fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
OLD=${OLD:-.carry/old} STEPS=${STEPS:-8} WARMUP=${WARMUP:-2} ROWS=$OUT/train_compare.jsonl
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "$GPU"
PYTHONPATH=/tmp/bnb:$PWD/src python3 -c "import sys, json; sys.path.insert(0, 'benchmarks/speed'); import train_speed as t; print(json.dumps(t.environment()))" >> "$ROWS" &

row() {  # stdin: a side's stdout; appends its ROW line with the side's name, the GPU's and the round (stderr: $OUT/SIDE-SIZE.log)
  python3 -c "
import json, sys
for line in sys.stdin:
    if line.startswith('ROW '):
        r = json.loads(line[4:]); r.update(side='$1', gpu='$GPU', round=${round:-1}); print(json.dumps(r))" | tee -a "$ROWS"
}

build() {  # the random checkpoint of shape $1 in /tmp/ck-$1 (kept until that shape has run, also across warm calls)
  PYTHONPATH=/tmp/bnb:$PWD/src python3 -c "import sys; sys.path.insert(0, 'benchmarks/speed'); import train_speed as t; t.build_random('/tmp/ck-$1', '$1', 4096)" \
    && touch /tmp/ck-$1/.built && { [ -z "$LLAMAFY" ] || llamafy /tmp/ck-$1; }
}

llamafy() {  # $1 converted to the Llama layout (models/llamafy.to_llama) in $1-llama
  PYTHONPATH=/tmp/bnb:$PWD/src python3 -c "
import torch
from transformers import AutoModelForCausalLM
from phikit.models.llamafy import to_llama
to_llama(AutoModelForCausalLM.from_pretrained('$1', dtype=torch.bfloat16)).save_pretrained('$1-llama')" 2>>$OUT/llamafy.log \
    && touch $1-llama/.built
}

for what in "$@"; do
  case $what in
    mini) size=phi-4-mini mb=2 ;;
    phi4) size=phi-4 mb=1 ;;
    tiny) size=tiny mb=2 ;;  # on the CPU: checks this script (Unsloth gives no row there)
    curve) ck=/tmp/ck-phi-4-mini
           [ -e $ck/.built ] || build phi-4-mini || exit 1
           for v in phikit phikit-fp8; do
             PYTHONPATH=/tmp/bnb:$PWD/src timeout 500 python3 benchmarks/speed/train_speed.py --impl $v --path $ck --size phi-4-mini \
               --seq 2048 --micro-batch 2 --dropout 0 --data markov --steps ${CURVE:-200} --warmup 0 2>>$OUT/curve-$v.log | row curve-${v#phikit-}
           done
           continue ;;
    test) [ -n "$PREBUILD" ] && { build "$PREBUILD" & }  # the next call's checkpoint, written while the tests run (untimed)
          PYTHONPATH=/tmp/bnb:$PWD/src timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider -rs -k "${TEST_K:-cuda or host}" tests/train/test_train_fast.py tests/train/test_train.py 2>&1 | tail -15
          wait
          continue ;;
    *) echo "unknown: $what"; continue ;;
  esac
  ck=/tmp/ck-$size
  [ -e $ck/.built ] || build $size || exit 1
  args="--impl ${IMPL:-phikit} --path $ck --size $size --seq 2048 --micro-batch $mb --dropout 0 --steps $STEPS --warmup $WARMUP ${ARGS:-}"
  SIDES=${SIDES:-old new unsloth}
  for round in $(seq ${REPEAT:-1}); do
    [[ $SIDES == *old* ]] && PYTHONPATH=/tmp/bnb timeout 200 python3 $(ls $OLD/benchmarks/speed/train_speed.py $OLD/benchmarks/train_speed.py 2>/dev/null | head -1) $args 2>>$OUT/old-$size.log | row old
    [[ $SIDES == *new* ]] && PYTHONPATH=/tmp/bnb:$PWD/src timeout 200 python3 benchmarks/speed/train_speed.py $args 2>>$OUT/new-$size.log | row new
    [ -n "$FP8" ] && PYTHONPATH=/tmp/bnb:$PWD/src timeout 200 python3 benchmarks/speed/train_speed.py ${args/--impl ${IMPL:-phikit}/--impl phikit-fp8} \
      2>>$OUT/new-fp8-$size.log | row new-fp8
    if [ -n "$LLAMAFY" ]; then  # the same checkpoint in the Llama layout, phikit's new side on it
      [ -e $ck-llama/.built ] || llamafy $ck || exit 1
      largs=${args/$ck/$ck-llama}
      PYTHONPATH=/tmp/bnb:$PWD/src timeout 200 python3 benchmarks/speed/train_speed.py $largs 2>>$OUT/new-llama-$size.log | row new-llama
      [ -n "$UNFUSED" ] && PYTHONPATH=/tmp/bnb:$PWD/src timeout 200 python3 benchmarks/speed/train_speed.py \
        ${largs/--impl ${IMPL:-phikit}/--impl phikit-unfused} 2>>$OUT/new-llama-unfused-$size.log | row new-llama-unfused
    fi
    [[ $SIDES == *unsloth* ]] && PYTHONPATH=/tmp/uns:/tmp/bnb timeout 200 python3 .pk/unsloth_train.py --path $ck --size $size --seq 2048 --micro-batch $mb \
      --dropout 0 --steps $STEPS --warmup $WARMUP 2>>$OUT/unsloth-$size.log | row unsloth
  done
  rm -rf "$ck-llama"
  rm -rf "$ck"
done
