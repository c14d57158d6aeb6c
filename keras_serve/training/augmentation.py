"""The `resnet` recipe's input pipeline: no tf.data, so the same code trains under any Keras
backend (TensorFlow on a CPU, JAX on a GPU).

- `MixedBatches`: a keras PyDataset over the in-memory uint8 images. It shuffles over the whole
  set each epoch (seeded by the epoch, so a resumed run sees the same order), scales through
  `preprocessing.to_model_input` (the server's own scaling) and mixes batches with mixup or
  cutmix in numpy, mixing the labels the same way.
- `build_augmenter`: random crops, flips and colour jitter as one Keras layer that runs inside
  the training graph (on the GPU when there is one), per image, only in training.
"""
from __future__ import annotations

import numpy as np

import keras
from keras import layers

from keras_serve.pipeline.preprocessing import PreprocessSpec, to_model_input


class RandomCropFlipJitter(layers.Layer):
    """Per image: a random crop (each axis its own scale, so the aspect ratio changes as the
    served resize changes it; zoomed out past the border by reflection), a shift, a horizontal
    flip, and brightness / contrast / saturation jitter. Identity when not training.

    One resampling, done as two small matrix products (separable bilinear interpolation):
    out[b] = Wy[b] @ image[b] @ Wx[b]^T. Keras's own RandomZoom/Translation/Rotation go
    through ops.image.affine_transform, which under JAX compiled for over a minute and ran
    4-15 times slower than the whole network's training step; matrix products are what
    a GPU (and oneDNN on a CPU) does best.
    """

    def __init__(self, zoom_in=0.35, zoom_out=0.1, translate=0.1, flip=True, color=0.2, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.zoom_in, self.zoom_out, self.translate, self.flip, self.color = zoom_in, zoom_out, translate, flip, color
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _weights(self, n: int, start, fraction, flip):
        """(B, n, n) bilinear interpolation matrices for source coordinates start + (i+0.5)*f - 0.5."""
        ops = keras.ops
        i = ops.arange(n, dtype="float32")[None, :]
        src = start[:, None] + (i + 0.5) * fraction[:, None] - 0.5
        src = ops.where(flip[:, None], n - 1.0 - src, src)
        period = ops.mod(src + 0.5, 2.0 * n)                       # reflect at the borders
        src = ops.clip(ops.where(period < n, period, 2.0 * n - period) - 0.5, 0.0, n - 1.0)
        j = ops.arange(n, dtype="float32")[None, None, :]
        return ops.relu(1.0 - ops.abs(src[:, :, None] - j))

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        batch, h, w = ops.shape(images)[0], images.shape[1], images.shape[2]

        def uniform(low, high):
            return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

        fy, fx = uniform(1.0 - self.zoom_in, 1.0 + self.zoom_out), uniform(1.0 - self.zoom_in, 1.0 + self.zoom_out)
        y0 = (1.0 - fy) * h * uniform(0.0, 1.0) + self.translate * h * uniform(-1.0, 1.0)
        x0 = (1.0 - fx) * w * uniform(0.0, 1.0) + self.translate * w * uniform(-1.0, 1.0)
        no_flip = ops.zeros((batch,), "bool")
        flip = uniform(0.0, 1.0) < 0.5 if self.flip else no_flip
        wy = self._weights(h, y0 * 1.0, fy, no_flip)
        wx = self._weights(w, x0 * 1.0, fx, flip)
        x = ops.einsum("bij,bjkc->bikc", wy, images)
        x = ops.einsum("bikc,blk->bilc", x, wx)
        if self.color:
            c = self.color
            grey = ops.sum(x * ops.convert_to_tensor([0.299, 0.587, 0.114], x.dtype), axis=-1, keepdims=True)
            x = grey + (x - grey) * uniform(1.0 - c, 1.0 + c)[:, None, None, None]            # saturation
            mean = ops.mean(grey, axis=(1, 2, 3), keepdims=True)
            x = (x - mean) * uniform(1.0 - c, 1.0 + c)[:, None, None, None] + mean            # contrast
            x = ops.clip(x * uniform(1.0 - c, 1.0 + c)[:, None, None, None], 0.0, 1.0)        # brightness
        return x

    def compute_output_shape(self, input_shape):
        return input_shape


def build_augmenter(cfg: dict, seed: int) -> keras.Sequential:
    """The recipe's augmentation, on inputs scaled to [0, 1]."""
    return keras.Sequential([RandomCropFlipJitter(cfg.get("zoom_in", 0.0), cfg.get("zoom_out", 0.0),
                                                  cfg.get("translate", 0.0), cfg.get("flip", True),
                                                  cfg.get("color", 0.0), seed=seed)], name="augment")


class MixedBatches(keras.utils.PyDataset):
    """(x, y, sample_weight) batches; `epoch` is set by `EpochSetter` before each epoch."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, weights: np.ndarray, spec: PreprocessSpec,
                 batch_size: int, seed: int, mix_prob: float = 0.0, mixup_alpha: float = 0.2,
                 cutmix_alpha: float = 1.0, mix_until: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pixels, self.labels, self.weights = pixels, labels.astype(np.float32), weights.astype(np.float32)
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.mix_prob, self.mixup_alpha, self.cutmix_alpha = mix_prob, mixup_alpha, cutmix_alpha
        self.mix_until = mix_until  # epochs from here on train on clean images (calibration)
        self.epoch = 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.pixels) // self.batch_size  # drop the remainder: every batch full

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.pixels))
            self._order_epoch = self.epoch
        return self._order

    def __getitem__(self, index: int):
        idx = np.sort(self.order()[index * self.batch_size:(index + 1) * self.batch_size])
        x = to_model_input(self.pixels[idx], self.spec)
        y = self.labels[idx]
        w = self.weights[idx]
        rng = np.random.default_rng((self.seed, self.epoch, index, 1))
        x = x[perm := rng.permutation(len(idx))]
        y, w = y[perm], w[perm]
        mixing = self.mix_until is None or self.epoch < self.mix_until
        if self.mix_prob and mixing and rng.random() < self.mix_prob:
            partner = np.roll(np.arange(len(idx)), 1)
            if rng.random() < 0.5:  # mixup: blend whole images
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
                x = lam * x + (1.0 - lam) * x[partner]
            else:  # cutmix: paste a box of the partner image, labels by area
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                h, wd = x.shape[1:3]
                cut_h, cut_w = int(h * np.sqrt(1.0 - lam)), int(wd * np.sqrt(1.0 - lam))
                cy, cx = int(rng.integers(h)), int(rng.integers(wd))
                y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
                x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, wd)
                x = x.copy()
                x[:, y0:y1, x0:x1] = x[partner, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * wd)
            y = lam * y + (1.0 - lam) * y[partner]
            w = lam * w + (1.0 - lam) * w[partner]
        return x.astype(np.float32), y[:, None], w


class EpochSetter(keras.callbacks.Callback):
    """Tells the dataset which epoch is starting (also after a resume)."""

    def __init__(self, dataset: MixedBatches):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.epoch = epoch
