"""Grad-CAM: where the model looked, from its last convolution layer (Selvaraju et al., 2017).

For one preprocessed image: the last 2-D convolution's feature maps A_k, the gradient of the
winning class's score (its logit where the model ends in a Dense/Activation with sigmoid or
softmax, so a saturated probability does not flatten the gradient to zero) with respect to
them, weights w_k = the mean of each map's gradient, and map = ReLU(sum_k w_k A_k) scaled to
[0, 1]. The map is on the convolution's grid (9x9 for the shipped model).

The last convolution is found by walking the layers, nested models included. Its output is
caught by wrapping that one layer's `call` while the Grad-CAM function is traced: the wrapper
only records and returns what the layer returns, is removed right after the (single) trace,
and traced functions never run Python again, so the serving path is untouched. This works
for Sequential, functional and nested models alike without rebuilding any of them.

Memory: no second copy of the model. The served Keras model (`ServedModel.model`, which the
server keeps loaded in any case) is reused; what the first heatmap adds is one traced graph
with its gradient (measured with the shipped model: docs/heatmap.md).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from keras_serve.errors import NoConvolutionLayerError


def _walk(model: Any) -> Iterator[Any]:
    """Every layer in order, descending into nested models (a model is itself a layer)."""
    for layer in getattr(model, "layers", ()):
        if getattr(layer, "layers", None):
            yield from _walk(layer)
        else:
            yield layer


def _is_image_convolution(layer: Any) -> bool:
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D,
             keras.layers.Conv2DTranspose)
    return isinstance(layer, kinds)


def last_convolution_layer(model: Any) -> Any:
    """The last 2-D convolution layer in the model, nested models included; raises
    NoConvolutionLayerError if there is none."""
    found = [layer for layer in _walk(model) if _is_image_convolution(layer)]
    if not found:
        raise NoConvolutionLayerError("The served model has no convolution layer, so no heatmap can be made.")
    return found[-1]


def _logit_head(model: Any) -> tuple[Any, str] | None:
    """(last layer, "dense"|"activation") when the model's output is sigmoid/softmax of what that
    layer receives (or computes), so the score can be taken before the squashing."""
    import keras

    layers = list(_walk(model))
    if not layers:
        return None
    last = layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "")
    if name not in ("sigmoid", "softmax"):
        return None
    if isinstance(last, keras.layers.Dense) and not getattr(last, "lora_enabled", False):
        return last, "dense"
    if isinstance(last, keras.layers.Activation):
        return last, "activation"
    return None


@contextmanager
def _recording(layer: Any, captured: dict[str, Any], key: str, what: str) -> Iterator[None]:
    """While inside: `layer`'s output ("output") or first input ("input") lands in captured[key]."""
    had_own = "call" in vars(layer)
    original = layer.call

    def recording_call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        captured[key] = out if what == "output" else args[0]
        return out

    layer.call = recording_call
    try:
        yield
    finally:
        if had_own:
            layer.call = original
        else:
            del layer.call


class GradCam:
    """Grad-CAM for one Keras model; `__call__` is thread-safe (it holds a lock while it runs)."""

    def __init__(self, model: Any, input_shape: tuple[int, ...], output_kind: str, labels: list[str],
                 threshold: float, logits_out: bool = False) -> None:
        import tensorflow as tf

        self.conv = last_convolution_layer(model)
        self.channels_first = getattr(self.conv, "data_format", "channels_last") == "channels_first"
        head = None if logits_out else _logit_head(model)
        self.output_kind = output_kind
        self.labels = labels
        self.threshold = threshold
        self._lock = threading.Lock()
        conv = self.conv

        @tf.function(input_signature=[tf.TensorSpec((1, *input_shape), tf.float32)])
        def features_and_gradients(x):
            captured: dict[str, Any] = {}
            with _recording(conv, captured, "features", "output"):
                with (_recording(head[0], captured, "head", "input") if head else _nothing()):
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        out = tf.reshape(model(x, training=False), (1, -1))
                        features = captured["features"]
                        if head is None:
                            scores = out  # probabilities, or logits when the model ends linear
                        elif head[1] == "dense":
                            layer = head[0]
                            scores = tf.matmul(captured["head"], layer.kernel)
                            if layer.use_bias:
                                scores = scores + layer.bias
                        else:
                            scores = captured["head"]
                        scores = tf.reshape(scores, (1, -1))
                        if head is not None:
                            scores = _logits_if_they_give(scores, out, head[0])
                        # Explain the label the server answered for this image.
                        if output_kind == "sigmoid":
                            p = tf.sigmoid(out[0, 0]) if logits_out else out[0, 0]
                            second = tf.cast(p >= threshold, scores.dtype)
                            # The first label's score is the negated logit (or 1 - p): same map, other sign.
                            score = scores[0, 0] * (2 * second - 1)
                            target = tf.cast(second, tf.int32)
                        else:
                            target = tf.cast(tf.argmax(out[0]), tf.int32)
                            score = tf.gather(scores[0], target)
            gradients = tape.gradient(score, features)
            return features, gradients, target

        self._features_and_gradients = features_and_gradients

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """float32 (1, *input_shape) model input -> (float32 (h, w) map in [0, 1] on the conv grid,
        index of the label it explains: the one the server answers)."""
        with self._lock:
            features, gradients, target = self._features_and_gradients(x)
        a = np.asarray(features, np.float64)[0]
        g = np.asarray(gradients, np.float64)[0]
        if self.channels_first:
            a, g = np.moveaxis(a, 0, -1), np.moveaxis(g, 0, -1)
        weights = g.reshape(-1, g.shape[-1]).mean(axis=0)
        cam = np.maximum((a * weights).sum(axis=-1), 0.0)
        peak = cam.max()
        cam = cam / peak if peak > 0 and np.isfinite(peak) else np.zeros_like(cam)
        return cam.astype(np.float32), int(target)


def _logits_if_they_give(logits: Any, out: Any, head: Any) -> Any:
    """`logits` where squashing them gives the model's output (the head really is the output
    layer), else the output itself: a branched model whose last-listed layer is not its output
    still gets a correct, if flatter, map."""
    import tensorflow as tf

    if logits.shape != out.shape:
        return out
    squashed = tf.sigmoid(logits) if head.activation.__name__ == "sigmoid" else tf.nn.softmax(logits)
    agrees = tf.reduce_max(tf.abs(squashed - tf.cast(out, squashed.dtype))) < 1e-4
    return tf.where(agrees, logits, tf.cast(out, logits.dtype))


@contextmanager
def _nothing() -> Iterator[None]:
    yield
