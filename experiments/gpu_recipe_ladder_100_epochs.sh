#!/bin/bash
# Issue 15, second H100 call: the recipe ladder at the full 100 epochs, six runs at once.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 PYTHONUNBUFFERED=1
P=.gpu_data/cats_vs_dogs.npz; W=/tmp/w; mkdir -p $W/logs
OLD_AUG='{"flip": true, "zoom_in": 0.2, "zoom_out": 0.2, "translate": 0.1, "color": 0}'
run() { name=$1; shift; python3 -m keras_serve.training.train --packed $P --arch resnet --quiet --workers 3 --labels CAT,DOG \
        --out $W/$name/cats_vs_dogs.h5 "$@" > $W/logs/$name.log 2>&1; }
run p1_recipe &
run p2_nomix --set mix_prob=0 &
run p3_nomix_noema --set mix_prob=0 --set ema=0 &
run p4_compact_aug --set architecture='"compact"' --set mix_prob=0 --set ema=0 &
run p5_compact_long --set architecture='"compact"' --set mix_prob=0 --set ema=0 --set augment="$OLD_AUG" &
run p6_recipe_seed2 --seed 2 &
snap() {
  python3 - <<'PY' > $OUT/ladder.json
import json, glob, os
out = {}
for d in sorted(glob.glob("/tmp/w/p*/")):
    name = os.path.basename(d.rstrip("/"))
    h = glob.glob(d + "*.work/history.json")
    rows = json.load(open(h[0])) if h else []
    card = glob.glob(d + "*.json")
    out[name] = {"epochs_done": len(rows), "best_val_accuracy": max([r.get("val_accuracy", 0) for r in rows] or [0]),
                 "card": {k: v for k, v in json.load(open(card[0])).items() if k in ("validation", "command")} if card else None,
                 "history": [[r["epoch"], r["seconds"], r.get("val_accuracy"), r.get("val_loss")] for r in rows]}
print(json.dumps(out))
PY
  tar -czf $OUT/logs2.tgz -C $W logs
  for n in p1_recipe p2_nomix p3_nomix_noema p6_recipe_seed2; do
    [ -f $W/$n/cats_vs_dogs.h5 ] && tar -cf $OUT/$n.tar -C $W/$n cats_vs_dogs.h5 cats_vs_dogs.json
  done
}
( while sleep 30; do snap; done ) &
SNAP=$!
wait $(jobs -p | grep -v $SNAP) 2>/dev/null
for j in $(jobs -p); do [ "$j" != "$SNAP" ] && wait $j; done
kill $SNAP; snap
python3 -c "
import json; d=json.load(open('$OUT/ladder.json'))
for k,v in d.items(): print(k, v['epochs_done'], v['best_val_accuracy'], v['card'] and {x: round(v['card']['validation'][x],4) for x in ('accuracy','roc_auc','ece')})"
