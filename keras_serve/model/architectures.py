"""Model architectures the project knows by name (training, and serving weights-only files).

All take 150x150 RGB scaled to [0, 1] (channels_last) and end in one sigmoid: CAT < 0.5 <= DOG.
"""
from __future__ import annotations

from typing import Callable

import keras
from keras import layers


def build_seed(input_shape: tuple[int, int, int] = (150, 150, 3)) -> keras.Model:
    """The 2017 Keras-blog recipe, layer for layer (about 1.21 M parameters at 150x150)."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="seed",
    )


def _conv_bn(x, filters: int, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.Activation("relu")(x)


def build_compact(input_shape: tuple[int, int, int] = (150, 150, 3), width: int = 24) -> keras.Model:
    """The default: a VGG-style CNN with batch norm, a strided stem and global pooling.

    The stem halves the resolution at once because the 150x150 stage dominates the cost on
    CPU; channels double at each pooling so work per stage stays level. Global average
    pooling instead of Flatten+Dense keeps parameters (and the file) small.
    """
    inputs = keras.Input(shape=input_shape)
    x = _conv_bn(inputs, width, strides=2)          # 75x75
    x = _conv_bn(x, width)
    x = layers.MaxPooling2D(2)(x)                   # 37x37
    x = _conv_bn(x, width * 2)
    x = _conv_bn(x, width * 2)
    x = layers.MaxPooling2D(2)(x)                   # 18x18
    x = _conv_bn(x, width * 4)
    x = _conv_bn(x, width * 4)
    x = layers.MaxPooling2D(2)(x)                   # 9x9
    x = _conv_bn(x, width * 8)
    x = _conv_bn(x, width * 8)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="compact")


def build_resnet(input_shape: tuple[int, int, int] = (150, 150, 3), width: int = 24) -> keras.Model:
    """compact's layers with a residual connection around each stage's second conv.

    Same convolutions, so the same CPU cost as compact (the adds are free). Deeper variants
    with residual depthwise-separable blocks at 18x18 and 9x9 were measured and dropped:
    each block added about 0.3 ms at batch 1 on the 2-core CPU (depthwise convs are slow
    there), and the issue allows no slower forward pass.
    """
    inputs = keras.Input(shape=input_shape)
    x = _conv_bn(inputs, width, strides=2)          # 75x75
    for stage in range(4):
        filters = width * 2 ** stage
        if stage:
            x = layers.MaxPooling2D(2)(x)           # 37, 18, 9
            x = _conv_bn(x, filters)
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        y = layers.BatchNormalization()(y)
        x = layers.Activation("relu")(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="resnet")


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "seed": build_seed,
    "compact": build_compact,
    "resnet": build_resnet,
}
