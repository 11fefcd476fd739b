#!/usr/bin/env bash
# What we run on a lent GPU machine (one short call per part; see bench/speed.py).
#
#   bash scripts/device_check.sh bench   # GPU benchmark + CUDA quality guard -> $OUT/gpu.*
#   bash scripts/device_check.sh attention  # BLIP's vision attention eager vs SDPA (the GPU default) -> $OUT/gpu-attention.*
#   bash scripts/device_check.sh batch  # blipserve batch over 640x480 JPEGs, BLIP-base and BLIP-2, vs the loop -> $OUT/gpu-batch-*.json
#   bash scripts/device_check.sh static  # BLIP-2 with --cuda-graphs (static KV cache) -> $OUT/gpu-static.*
#   bash scripts/device_check.sh static-blip  # BLIP-base with --cuda-graphs -> $OUT/gpu-static-blip.*
#   bash scripts/device_check.sh pipeline  # the host's cores: batch pipeline vs stand-in models -> $OUT/pipeline.json
#   bash scripts/device_check.sh big-batch  # BLIP-base batch 256, vision 64 vs the default -> $OUT/gpu-big-batch.*
#   bash scripts/device_check.sh warmup  # --cuda-graphs warm-up: no compilation left for requests
#   bash scripts/device_check.sh train   # demo-vqa recipe variants side by side -> $OUT/train-logs.tgz
# Parts can be combined: scripts/device_check.sh static train
#
# That machine has torch and transformers but not blipserve's other dependencies: wheels
# for them (and for the transformers we test with) may be carried in .whl/ (untracked;
# `run` with carry [".whl"]).  Used on 2026-11-26, for its Python 3.12: transformers
# 5.24.0, tokenizers 0.23.3, regex 2026.11.19, pydantic 2.14.4, pydantic_core 2.50.5
# (cp312 manylinux), annotated-types 0.8.0, typing-inspection 0.4.5, typing_extensions
# 4.16.0 -- `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux2014_x86_64 -d .whl NAME==VERSION ...`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

for part in "${@:-bench}"; do
case "$part" in
bench)
  timeout "${BENCH_SECONDS:-300}" "$PY" bench/speed.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
  ;;
attention)  # BLIP-base's vision attention on the GPU: transformers' eager code against SDPA
  # (blipserve's GPU default since issue 22, not yet measured there), interleaved passes
  timeout "${ATTENTION_SECONDS:-300}" "$PY" bench/speed.py --models blip-image-captioning-base \
    --modes bfloat16-eager bfloat16-sdpa --batches ${ATTENTION_BATCHES:-8 64} \
    --baseline-images 16 --repeats "${ATTENTION_REPEATS:-3}" --guard-scenes 200 \
    --out "$OUT/gpu-attention.json" 2>&1 | tee "$OUT/gpu-attention.log"
  ;;
batch)  # issue 22's targets: `blipserve batch` end to end over a folder of 640x480 JPEGs on
  # the GPU against the catalog's per-image loop (float32) in the same run, with the image
  # resize on the CPU (the processor) as the A/B of --image-resize's GPU default
  for layout in blip-image-captioning-base blip2-opt-2.7b; do
    timeout "${BATCH_SECONDS:-240}" "$PY" bench/batch.py --device cuda --layout "$layout" \
      --size 640x480 --images "${BATCH_IMAGES:-2048}" --loop-images "${LOOP_IMAGES:-64}" \
      --repeats "${BATCH_REPEATS:-2}" --compare "--image-resize processor" \
      --out "$OUT/gpu-batch-$layout.json" 2>&1 | tee "$OUT/gpu-batch-$layout.log"
  done
  ;;
static)  # BLIP-2 with --cuda-graphs (a static KV cache: generate compiles the LM step),
  # full-size OPT-2.7b at three batch sizes (eager and compiled in interleaved pairs), and
  # demo-vqa's captions and answers with and without it (the quality check that random
  # weights cannot give)
  timeout "${STATIC_SECONDS:-420}" "$PY" bench/speed.py --models blip2-opt-2.7b \
    --batches ${STATIC_BATCHES:-1 8 32} --static-batches ${STATIC_BATCHES:-1 8 32} \
    --baseline-images 16 --static-cache --no-guard --guard-scenes "${GUARD_SCENES:-200}" \
    --repeats "${STATIC_REPEATS:-3}" \
    --out "$OUT/gpu-static.json" 2>&1 | tee "$OUT/gpu-static.log"
  ;;
pipeline)  # no GPU needed: whether the host's 16 cores decode fast enough to keep a model
  # of 1,000 images/s busy (stand-in models, threads vs worker processes), 1 min
  timeout "${PIPELINE_SECONDS:-120}" "$PY" bench/pipeline.py --images 4096 --size 640x480 \
    --repeats 2 --out "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.log"
  ;;
big-batch)  # larger decoder batches with the vision encoder kept at 64 images a call
  # (--vision-batch-size) against the default 64-row batches, end to end over JPEGs:
  # issue 22's open question of separate batch sizes
  timeout "${BATCH_SECONDS:-300}" "$PY" bench/batch.py --device cuda \
    --layout blip-image-captioning-base --size 640x480 --images "${BATCH_IMAGES:-2048}" \
    --loop-images 16 --repeats "${BATCH_REPEATS:-2}" \
    --compare "--max-batch-size 256 --vision-batch-size 64" \
    --out "$OUT/gpu-big-batch.json" 2>&1 | tee "$OUT/gpu-big-batch.log"
  ;;
static-blip)  # BLIP-base with --cuda-graphs (issue 22: its text decoder on two static
  # caches, the text's and the image's), eager and compiled in interleaved pairs, and the
  # demo captioner's captions with and without it
  timeout "${STATIC_SECONDS:-420}" "$PY" bench/speed.py --models blip-image-captioning-base \
    --batches ${STATIC_BATCHES:-8 64} --static-batches ${STATIC_BATCHES:-8 64} \
    --baseline-images 16 --static-cache --no-guard --guard-scenes "${GUARD_SCENES:-200}" \
    --repeats "${STATIC_REPEATS:-3}" \
    --out "$OUT/gpu-static-blip.json" 2>&1 | tee "$OUT/gpu-static-blip.log"
  ;;
warmup)  # --cuda-graphs: warm-up compiles each padded batch size; later batches must not
  timeout "${WARMUP_SECONDS:-240}" "$PY" - <<'PY' 2>&1 | tee "$OUT/gpu-warmup.log"
import base64, io, logging, time
from blipserve.config import EngineConfig, ModelConfig
from blipserve.types import RowInput
from blipserve.finetune import scenes
from blipserve.engine import Engine
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
held = list(scenes.generate(scenes.HELDOUT_SEED + 1, 40))
def b64(img):
    buf = io.BytesIO(); img.save(buf, format="PNG"); return base64.b64encode(buf.getvalue()).decode()
rows = [RowInput(i, b64(s.image), s.qa[0].prompt if i % 2 else None) for i, s in enumerate(held)]
cfg = ModelConfig(model="demo-vqa", device="cuda", dtype="bfloat16", cuda_graphs=True)
t = time.perf_counter()
engine = Engine.load(cfg, config=EngineConfig(max_batch_size=32))
engine.warm_up()
print(f"load + warm-up: {time.perf_counter() - t:.1f} s", flush=True)
for n in (3, 8, 20, 32, 40, 1):
    t = time.perf_counter(); engine.predict(rows[:n]); print(f"{n} rows: {time.perf_counter() - t:.2f} s", flush=True)
PY
  ;;
train)
  # demo-vqa recipe variants, each its own process (scene drawing is single-threaded CPU
  # work; the GPU has room for all).  Periodic held-out evaluation goes to each log.
  deadline=${TRAIN_SECONDS:-300}
  steps=${TRAIN_STEPS:-4000}
  common=(--init config:blip2 --vision-init src/blipserve/demo/models/demo --data synthetic
    --eval-data synthetic --batch-size 64 --warmup-steps 200 --eval-every 500
    --eval-examples 200 --save-every 100000 --num-threads 2 --hidden-size 160
    --vision-layers 4 --text-layers 4 --device "${TRAIN_DEVICE:-cuda}" --no-progress --max-steps "$steps")
  declare -A variants
  base="--qformer-layers 2 --num-query-tokens 16 --caption-fraction 0.4 --lr 1e-3 --freeze-vision"
  qinit="--qformer-layers 4 --qformer-init src/blipserve/demo/models/demo"
  if [ "${SWEEP:-2}" = 1 ]; then  # 2026-11-26, first sweep: Q-Former size, queries, mix, ViT
    variants=(
      [a-base]="$base"
      [b-q4]="$base --qformer-layers 4"
      [c-n32]="$base --num-query-tokens 32"
      [d-cf6]="$base --caption-fraction 0.6"
      [e-vit]="$base --no-freeze-vision"
      [f-q4n32]="$base --qformer-layers 4 --num-query-tokens 32 --caption-fraction 0.5"
    )
  else  # second sweep: Q-Former from demo's decoder, learning rate.  (It also tried a loss
    # averaged per example rather than per token, an option since removed: it did not pay.)
    variants=(
      [a-base]="$base"
      [h-qi4]="$base $qinit"
      [k-lr5e-4]="$base --lr 5e-4"
      [l-lr2e-3]="$base --lr 2e-3"
    )
  fi
  work=/tmp/variants
  mkdir -p "$work"
  for name in "${!variants[@]}"; do
    # shellcheck disable=SC2086  # the variant's flags are meant to split
    timeout "$deadline" "$PY" -m blipserve.cli finetune "${common[@]}" ${variants[$name]} \
      --output-dir "$work/$name" >"$work/$name.log" 2>&1 &
  done
  wait
  grep -H '"step"' "$work"/*.log | sed 's/.*variants\///' | cut -c1-400
  # the two best finished models by held-out exact match come back too
  best=$(for s in "$work"/*/finetune_summary.json; do
    [ -f "$s" ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['final_eval'].get('exact',0), sys.argv[1])" "$s"
  done | sort -rn | head -2 | awk '{print $2}' | xargs -r -n1 dirname | xargs -r -n1 basename)
  tar -czf "$OUT/train-logs.tgz" -C "$work" $(cd "$work" && ls ./*.log)
  # (a file that comes back is at most 16 MiB: the models travel in parts)
  [ -n "$best" ] && tar -cf - --exclude=checkpoints -C "$work" $best | split -b 15M - "$OUT/best-models.tar.part-"
  ls -la "$OUT"
  ;;
esac
done
