#!/bin/bash
# Issue 15 on one H100 (Keras 3 + JAX): the first full resnet run and the 25-epoch ablations, all at once.
# (Run before the package layout landed as `python3 train.py`; the module form is the same program.)
# Ran before train.py had mix_off_epochs: the "final" here mixed batches to the end (ECE 0.034 on the
# original photos); to rerun it now add --set mix_off_epochs=0 to the final run.
# Run in the repository root of the GPU machine with .whl/ (keras 3.15.1, namex, optree wheels)
# and .gpu_data/cats_vs_dogs.npz (pack_data.py). Results go to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 PYTHONUNBUFFERED=1
P=.gpu_data/cats_vs_dogs.npz; W=/tmp/w; mkdir -p $W/logs
EPOCHS=${EPOCHS:-100}; AB=${AB:-25}
OLD_AUG='{"flip": true, "zoom_in": 0.2, "zoom_out": 0.2, "translate": 0.1, "color": 0}'
COMMON="--packed $P --arch resnet --quiet --workers 3"
# resume the final run if a backup came along
[ -f .gpu_data/final_backup.tar ] && mkdir -p $W/final && tar -xf .gpu_data/final_backup.tar -C $W/final
python3 -m keras_serve.training.train $COMMON --epochs $EPOCHS --out $W/final/cats_vs_dogs.h5 --labels CAT,DOG > $W/logs/final.log 2>&1 &
FINAL=$!
ab() { name=$1; shift; nice python3 -m keras_serve.training.train $COMMON --out $W/$name/m.h5 --labels CAT,DOG "$@" > $W/logs/$name.log 2>&1; }
BASE="--epochs $AB --set warmup_epochs=3"
ab a1_previous --epochs 16 --batch-size 32 --set architecture='"compact"' --set mix_prob=0 --set ema=0 \
   --set weight_decay=0.0005 --set warmup_epochs=1 --set augment="$OLD_AUG" &
ab a2_long $BASE --set architecture='"compact"' --set mix_prob=0 --set ema=0 --set augment="$OLD_AUG" &
ab a3_aug $BASE --set architecture='"compact"' --set mix_prob=0 --set ema=0 &
ab a4_mix $BASE --set architecture='"compact"' --set ema=0 &
ab a5_ema $BASE --set architecture='"compact"' &
ab a6_resnet $BASE &
snap() {
  cp $W/final/cats_vs_dogs.work/history.json $OUT/final_history.json 2>/dev/null
  cp $W/final/cats_vs_dogs.work/best.keras $OUT/final_best.keras 2>/dev/null
  (cd $W/final && tar -cf $OUT/final_backup.tar cats_vs_dogs.work/backup cats_vs_dogs.work/history.json cats_vs_dogs.work/best.json cats_vs_dogs.work/best.keras 2>/dev/null)
  python3 - <<'PY' > $OUT/ablations.json
import json, glob, os
out = {}
for d in sorted(glob.glob("/tmp/w/*/")):
    name = os.path.basename(d.rstrip("/"))
    h = glob.glob(d + "*.work/history.json")
    rows = json.load(open(h[0])) if h else []
    card = glob.glob(d + "*.json")
    out[name] = {"epochs_done": len(rows), "best_val_accuracy": max([r.get("val_accuracy", 0) for r in rows] or [0]),
                 "last": rows[-1] if rows else None,
                 "card_validation": {k: v for k, v in json.load(open(card[0]))["validation"].items()
                                     if k in ("accuracy", "roc_auc", "ece", "brier")} if card else None}
print(json.dumps(out, indent=1))
PY
  tar -czf $OUT/logs.tgz -C $W logs
}
while kill -0 $FINAL 2>/dev/null; do sleep 20; snap; done
wait
snap
cp $W/final/cats_vs_dogs.h5 $W/final/cats_vs_dogs.json $OUT/ 2>/dev/null
cat $OUT/ablations.json; tail -3 $W/logs/final.log
