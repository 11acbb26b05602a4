#!/usr/bin/env bash
# Issue #6: train the fine-grid bundle (canonical grid 96x96x304 at 1.5 mm) on the GPU machine in one `run`
# call of about 6 minutes, and put the bundles and training logs into $OUT. Run from the repository root:
#
#     bash benchmarks/gpu/train_fine.sh          (carry: .gpu = packed data + the monai wheel)
#
# The GPU machine has torch, numpy, scipy, safetensors, tqdm, matplotlib, scikit-image, but no MONAI (its
# wheel travels in .gpu/whl), no SimpleITK and no VTK (stand-ins in benchmarks/gpu/stubs let the modules that
# import them at the top load; training and export never call them) and no phantom generator; the data were
# made on a CPU machine and packed by benchmarks/gpu/fine_data.py (see there; `make_pack` below).
#
# Stages: unpack the data; step 1 (recipe-fine/step1.json); step 3 (recipe-fine/step3.json: PCA32 on the
# 2x-pooled grid + a VAE, LocNet from step 1); export two bundles (--locnet step1 --float16). Step 1 and the
# VAE first train one epoch as a probe (--max-steps), then resume (runs resume exactly; the number of epochs
# is not part of a run's fingerprint) with as many epochs as fit their time budget (stage.py epochs). The
# PCA bundle is exported and packed before the VAE trains further, so a later failure still brings it back.
# VAE_BUDGET_S=0 leaves the VAE out (step 3 fits the PCA only; no VAE bundle).
#
# Files in $OUT (each under 15 MiB; larger ones are split into NAME.part0, NAME.part1, ...):
#   log.txt                         everything this script printed, with timestamps
#   bundle-fine-pca32x2.tar.xz      the fine bundle folder fine-pca32x2/ (config.json, weights.safetensors)
#   bundle-fine-vae.tar.xz          the same with the VAE
#   logs.tar.xz                     step1/, step3/{locnet,pca32x2,vae}/: log.csv, curves.png, model.json;
#                                   the configurations used
# Here:  cat bundle-fine-pca32x2.tar.xz.part* > b.tar.xz (if split); tar -xJf b.tar.xz -C runs/fine/
#
# Environment (defaults are the GPU run's; the CPU test sets PY, DEVICE, WORK, PACK and small budgets):
#   OUT (required), PY=python3, DEVICE=cuda, PACK=.gpu/fine-data.npz, WORK=/tmp/fine, THREADS=0 (all cores),
#   STEP1_BUDGET_S=100 / VAE_BUDGET_S=100 (seconds of training, probe included; VAE_BUDGET_S=0: no VAE),
#   STEP1_MAX_EPOCHS=60 / VAE_MAX_EPOCHS=80, DEADLINE_S=400 (stages shrink their budgets to end by then),
#   STEP1_RESERVE_S (seconds step 1's budget leaves before DEADLINE_S for its own start-up and the aligned
#   set, step 3 and packing: 200 with the VAE, 60 without).
set -euo pipefail
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PACK=${PACK:-.gpu/fine-data.npz}
WORK=${WORK:-/tmp/fine}
THREADS=${THREADS:-0}
STEP1_BUDGET_S=${STEP1_BUDGET_S:-100}
VAE_BUDGET_S=${VAE_BUDGET_S:-100}
STEP1_MAX_EPOCHS=${STEP1_MAX_EPOCHS:-60}
VAE_MAX_EPOCHS=${VAE_MAX_EPOCHS:-80}
DEADLINE_S=${DEADLINE_S:-400}
STEP1_RESERVE_S=${STEP1_RESERVE_S:-$(( VAE_BUDGET_S > 0 ? 200 : 60 ))}
RECIPE=Resources/Models/recipe-fine
T0=$(date +%s)

mkdir -p "$OUT"
exec 3>&1 4>&2
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
finish() {
  local rc=$?
  stamp "exit status $rc"
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null || true
}
trap finish EXIT
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
# budget_for STAGE_BUDGET RESERVE: the stage budget, shrunk so that RESERVE seconds remain before DEADLINE_S.
budget_for() {
  local left=$(( DEADLINE_S - $(elapsed) - $2 ))
  (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"
}
recon() { "$PY" -m TibiaReconstructionLib.cli "$@"; }
# xz_fast: stdin -> stdout, xz (Python's lzma where the xz command is missing).
xz_fast() {
  if command -v xz >/dev/null; then xz -1 -T0; else
    "$PY" -c "import lzma, shutil, sys; w = lzma.LZMAFile(sys.stdout.buffer, 'wb', preset=1)
shutil.copyfileobj(sys.stdin.buffer, w); w.close()"; fi
}
# pack_out FOLDER NAME: FOLDER as $OUT/NAME.tar.xz, split into 15 MiB parts when larger.
pack_out() {
  tar -C "$(dirname "$1")" -cf - "$(basename "$1")" | xz_fast > "$OUT/$2.tar.xz"
  if (( $(stat -c %s "$OUT/$2.tar.xz") > 15 * 1024 * 1024 )); then
    split -b 15M -d -a 1 "$OUT/$2.tar.xz" "$OUT/$2.tar.xz.part" && rm "$OUT/$2.tar.xz"
  fi
  ls -l "$OUT"/"$2".tar.xz*
}

stamp "start: $(uname -n), DEVICE=$DEVICE, budgets step1 ${STEP1_BUDGET_S}s vae ${VAE_BUDGET_S}s, deadline ${DEADLINE_S}s (step-1 reserve ${STEP1_RESERVE_S}s)"
git log -1 --format='commit %H %s' 2>/dev/null || true
if [[ $DEVICE == cuda* ]]; then nvidia-smi -L || true; fi
mkdir -p /tmp/site
if ! "$PY" -c "import monai" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/benchmarks/gpu/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, monai, SimpleITK, vtk; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| monai', monai.__version__,
  '| SimpleITK', SimpleITK.__file__, '| vtk', vtk.__file__)"

stamp "unpack $PACK"
rm -rf "$WORK" && mkdir -p "$WORK/cfg" "$WORK/bundles"
"$PY" benchmarks/gpu/fine_data.py unpack "$PACK" --out "$WORK/data/train" --device "$DEVICE"
N=$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['cases']))" "$WORK/data/train/manifest.json")
S1="$WORK/runs/step1" S3="$WORK/runs/step3"
common=("device=\"$DEVICE\"" "threads=$THREADS")

stamp "step 1 probe: 1 epoch on $N cases"
"$PY" benchmarks/gpu/stage.py config $RECIPE/step1.json "$WORK/cfg/step1.json" "${common[@]}" "epochs=$STEP1_MAX_EPOCHS"
SPE1=$("$PY" -c "import json, math, sys; print(math.ceil($N / json.load(open(sys.argv[1]))['batch_size']))" \
  "$WORK/cfg/step1.json")
recon train step1 --config "$WORK/cfg/step1.json" --data "$WORK/data/train" --out "$S1" --max-steps "$SPE1"
E1=$("$PY" benchmarks/gpu/stage.py epochs "$S1/log.csv" "$SPE1" "$(budget_for "$STEP1_BUDGET_S" "$STEP1_RESERVE_S")" "$STEP1_MAX_EPOCHS")
stamp "step 1: resume to $E1 epochs"
"$PY" benchmarks/gpu/stage.py config $RECIPE/step1.json "$WORK/cfg/step1.json" "${common[@]}" "epochs=$E1"
recon train step1 --config "$WORK/cfg/step1.json" --data "$WORK/data/train" --out "$S1" --resume

if (( VAE_BUDGET_S > 0 )); then
  stamp "step 3 probe: LocNet from step 1 (evaluated), PCA32 on the 2x-pooled grid, 1 VAE epoch"
  "$PY" benchmarks/gpu/stage.py config $RECIPE/step3.json "$WORK/cfg/step3.json" "${common[@]}" "autoencoders.vae.epochs=$VAE_MAX_EPOCHS"
  SPE3=$("$PY" -c "import json, math, sys; print(math.ceil($N / json.load(open(sys.argv[1]))['autoencoders']['vae']['batch_size']))" \
    "$WORK/cfg/step3.json")
  recon train step3 --config "$WORK/cfg/step3.json" --data "$S1/aligned" --out "$S3" --step1 "$S1" --max-steps "$SPE3"
else
  stamp "step 3: LocNet from step 1 (evaluated), PCA32 on the 2x-pooled grid (no VAE: VAE_BUDGET_S=0)"
  "$PY" benchmarks/gpu/stage.py config $RECIPE/step3.json "$WORK/cfg/step3.json" "${common[@]}" -autoencoders.vae
  recon train step3 --config "$WORK/cfg/step3.json" --data "$S1/aligned" --out "$S3" --step1 "$S1"
fi
stamp "export + pack the PCA bundle"
recon export-bundle --step1 "$S1" --step3 "$S3" --ae pca32x2 --locnet step1 --float16 --out "$WORK/bundles/fine-pca32x2"
pack_out "$WORK/bundles/fine-pca32x2" bundle-fine-pca32x2

EV=0
LOGS=(cfg runs/step1/{log.csv,curves.png,model.json} runs/step3/{locnet,pca32x2}/model.json)
if (( VAE_BUDGET_S > 0 )); then
  EV=$("$PY" benchmarks/gpu/stage.py epochs "$S3/vae/log.csv" "$SPE3" "$(budget_for "$VAE_BUDGET_S" 60)" "$VAE_MAX_EPOCHS")
  stamp "VAE: resume to $EV epochs"
  "$PY" benchmarks/gpu/stage.py config $RECIPE/step3.json "$WORK/cfg/step3.json" "${common[@]}" "autoencoders.vae.epochs=$EV"
  recon train step3 --config "$WORK/cfg/step3.json" --data "$S1/aligned" --out "$S3" --step1 "$S1" --resume
  stamp "export + pack the VAE bundle"
  recon export-bundle --step1 "$S1" --step3 "$S3" --ae vae --locnet step1 --float16 --out "$WORK/bundles/fine-vae"
  pack_out "$WORK/bundles/fine-vae" bundle-fine-vae
  LOGS+=(runs/step3/vae/{model.json,log.csv,curves.png})
fi

stamp "logs"
(cd "$WORK" && tar -cf - "${LOGS[@]}" 2>/dev/null) | xz_fast > "$OUT/logs.tar.xz" || true
(cd "$WORK/bundles" && sha256sum */weights.safetensors */config.json)
ls -l "$OUT"
stamp "done: step 1 $E1 epochs, VAE $EV epochs"
