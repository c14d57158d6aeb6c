#!/bin/bash
# Issue 15, GPU smoke test: the resnet recipe under Keras 3 + JAX from the packed data, alone and
# four at a time on one GPU, 2 epochs each. Run in the repository root on the GPU machine.
# As run, with Keras's RandomZoom/Translation/Rotation layers, it did not finish one epoch in
# 5 minutes (their JAX affine transform); augmentation.RandomCropFlipJitter replaced them.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
python3 -c "import keras, jax; print('keras', keras.__version__, jax.devices())"
T=/tmp/smoke; mkdir -p $T
start=$(date +%s)
python3 -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --epochs 2 --out $T/a/m.h5 --quiet > $OUT/alone.log 2>&1
echo "alone: $(( $(date +%s) - start )) s"; tail -5 $OUT/alone.log
cp $T/a/m.h5 $T/a/m.json $OUT/
start=$(date +%s)
python3 -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --epochs 2 --out $T/b1/m.h5 --quiet > $OUT/p1.log 2>&1 &
python3 -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --epochs 2 --out $T/b2/m.h5 --quiet --set architecture='"compact"' --set mix_prob=0 --set ema=0 > $OUT/p2.log 2>&1 &
python3 -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --epochs 2 --batch-size 32 --out $T/b3/m.h5 --quiet > $OUT/p3.log 2>&1 &
python3 -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --epochs 2 --out $T/b4/m.h5 --quiet > $OUT/p4.log 2>&1 &
wait
echo "four at once: $(( $(date +%s) - start )) s"
for i in 1 2 3 4; do grep -E "^[0-9]+/[0-9]+ -|saved" $OUT/p$i.log; done
