#!/bin/bash
# Issue 15, third H100 call: the recipe (best epoch chosen among the clean last 15) with seeds 2 and 3.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 PYTHONUNBUFFERED=1
P=.gpu_data/cats_vs_dogs.npz; W=/tmp/w; mkdir -p $W/logs
run() { name=$1; shift; python3 -m keras_serve.training.train --packed $P --arch resnet --quiet --workers 6 --labels CAT,DOG \
        --out $W/$name/cats_vs_dogs.h5 "$@" > $W/logs/$name.log 2>&1;
        tar -cf $OUT/$name.tar -C $W/$name cats_vs_dogs.h5 cats_vs_dogs.json cats_vs_dogs.work/history.json cats_vs_dogs.work/best.json; }
run s2 --seed 2 &
run s3 --seed 3 &
( while sleep 20; do tar -czf $OUT/logs3.tgz -C $W logs; done ) &
wait %1 %2
tar -czf $OUT/logs3.tgz -C $W logs
grep saved $W/logs/*.log
