# The training-speed runs of issue 9 on the device machine (one call; results under $OUT):
#   run: bash benchmarks/gpu/train_speed.sh [mini|long|phi4|test ...]   carry: .whl (bitsandbytes, liger-kernel wheels)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for what in "$@"; do
  case $what in
    mini) python benchmarks/speed/train_speed.py --impls ${IMPLS:-phikit,phikit-eager,phikit-no-offload,stock,stock-liger} --profile --out $OUT/train_speed_mini.jsonl ;;
    curve) python benchmarks/speed/train_speed.py --impls phikit,stock --dropout 0 --out $OUT/train_speed_curve.jsonl ;;
    long) timeout 300 python benchmarks/speed/train_speed.py --impls phikit --seq ${LONG_SEQ:-131072} --micro-batch 1 --steps 1 --warmup 1 --out $OUT/train_speed_long.jsonl ;;
    variants) python benchmarks/speed/train_speed.py --impls phikit --dropout 0 --out $OUT/train_speed_variants.jsonl; python benchmarks/speed/train_speed.py --impls phikit --optim adamw-fused --out $OUT/train_speed_variants.jsonl ;;
    phi4) python benchmarks/speed/train_speed.py --size phi-4 --micro-batch 1 --impls ${IMPLS4:-phikit,stock} --profile --out $OUT/train_speed_phi4.jsonl ;;
    mem) python benchmarks/speed/train_speed.py --impls phikit --memory --steps 3 --out $OUT/train_speed_mem.jsonl
         python benchmarks/speed/train_speed.py --size phi-4 --micro-batch 1 --impls phikit --memory --steps 3 --out $OUT/train_speed_mem.jsonl ;;
    dropout) for d in 0.05 0; do python benchmarks/speed/train_speed.py --impls phikit --dropout $d --out $OUT/train_speed_dropout.jsonl
                                  python benchmarks/speed/train_speed.py --size phi-4 --micro-batch 1 --impls phikit --dropout $d --out $OUT/train_speed_dropout.jsonl; done ;;
    test) python -m pytest -q -p no:cacheprovider tests/train/test_train_fast.py tests/train/test_train.py 2>&1 | tail -5 ;;
  esac
done
