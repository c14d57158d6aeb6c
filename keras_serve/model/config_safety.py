"""Refuse a stored Keras model config that would run code or need code, before any library reads it.

A model file's config (`model_config` in a .h5, `config.json` in a .keras zip) tells the loader
which classes and functions to build. The loaders trust it: tf_keras's legacy HDF5 loader
unmarshals the Python bytecode a `Lambda` layer holds and runs it, and every loader resolves
class and module names the file chooses. So the config is walked here, as plain JSON, and
refused unless everything it names is one of Keras's own built-ins:

- `Lambda` layers only with a named built-in activation; no marshalled bytecode (`function_type`
  "lambda", Keras 3's `__lambda__`), anywhere in the config;
- every `class_name` a built-in layer, model, initializer, regularizer, constraint, dtype policy
  or graph operation of Keras 3 or tf_keras (the names come from the libraries' own public
  modules), never one that loads another model or framework (TFSMLayer, TorchModuleWrapper, ...);
- every `module` inside `keras`/`tf_keras`; no `registered_name` of a custom object (`Package>Name`);
- activation, initializer, regularizer and constraint names built in, and TensorFlow functions
  in tf_keras graphs (TFOpLambda) only from the math and array namespaces.

Nothing in the file is deserialized: the Keras modules are imported for their name lists only.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterable

from keras_serve.errors import ModelCodeRefused

MAX_CONFIG_DEPTH = 200  # real models nest a few dozen levels; JSON this deep is built to hurt

# Serialized values, not classes: tensors, slices, tuples (Keras 3 and tf_keras).
_VALUE_MARKERS = frozenset({"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__",
                            "__slice__", "__tuple__"})
_BYTECODE_MARKER = "__lambda__"
_PLAIN_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                           "float16", "bfloat16", "float32", "float64"})
# Built into Keras, but their config names another model, framework or file to load.
_REFUSED_BUILTINS = {
    "TFSMLayer": "loads a TensorFlow SavedModel from a path",
    "TorchModuleWrapper": "holds a pickled PyTorch module",
    "JaxLayer": "calls JAX functions the file names",
    "FlaxLayer": "calls a Flax module the file names",
    "TensorFlowOpLayer": "builds arbitrary TensorFlow operations",
}
# Keras 3 graph operations that take Python callables.
_CALLABLE_OPS = frozenset({"Map", "Scan", "AssociativeScan", "Cond", "WhileLoop", "ForiLoop", "VectorizedMap",
                           "Switch", "CustomGradient"})
# tf_keras graphs record TensorFlow calls (x * 2, tf.nn.relu(x)) as TFOpLambda layers naming the
# function; math and array operations only, never I/O, py_function, raw_ops or compat.
_TF_OP_NAMESPACES = ("math.", "nn.", "__operators__.", "image.", "linalg.", "signal.", "bitwise.")
_TF_ARRAY_OPS = frozenset("""
    abs add add_n argmax argmin argsort boolean_mask broadcast_to cast clip_by_norm clip_by_value concat cumsum
    divide einsum equal exp expand_dims fill gather gather_nd greater greater_equal identity less less_equal linspace
    matmul maximum minimum multiply negative norm not_equal one_hot ones ones_like pad pow range rank reduce_all
    reduce_any reduce_logsumexp reduce_max reduce_mean reduce_min reduce_prod reduce_std reduce_sum reduce_variance
    reshape reverse roll round shape sigmoid sign size slice sort split sqrt square squeeze stack stop_gradient
    strided_slice subtract tanh tensordot tile transpose truediv unstack where zeros zeros_like
""".split())
_NAME_KINDS = (("activation", re.compile(r"(^|_)activation$")), ("initializer", re.compile(r"_initializer$")),
               ("regularizer", re.compile(r"_regularizer$")), ("constraint", re.compile(r"_constraint$")))
_NOT_OBJECTS = frozenset({"get", "serialize", "deserialize"})
_DISCARDED = re.compile(r"_(initializer|regularizer|constraint)$")  # as keras_formats._INFERENCE_IRRELEVANT
# Where a config holds layers ("config": Keras 2.0-2.1 Sequential); a dtype policy's config has a
# "name" too, and is no layer.
_LAYER_KEYS = frozenset({None, "config", "layers", "layer", "backward_layer", "forward_layer", "cell", "cells"})
Where = tuple[Any, str, str]  # (layer name, class name, "layer" or "model"), as the file gives them


@dataclass(frozen=True)
class BuiltinNames:
    classes: frozenset[str]
    functions: dict[str, frozenset[str]]  # "activation" | "initializer" | ... -> names a string may give


def check_config(config: Any, with_tf_keras: bool) -> None:
    """Raise ModelCodeRefused naming the first layer whose config would run or need code.

    `with_tf_keras`: the file may be rebuilt by tf_keras as well as Keras 3 (a Keras 2 file),
    so tf_keras's built-ins are allowed too; and an initializer, regularizer or constraint
    Keras no longer knows is let through by name (never with a module or a registered name from
    outside Keras): every loader resolves it among Keras's own objects only, and the patched
    rebuild (keras_formats.patch_legacy_config) drops those keys, as they do not change outputs.
    """
    _Walk(builtin_names(with_tf_keras), tolerate_discarded=with_tf_keras).node(config, None, None, 0)


def _shown(text: Any, limit: int = 80) -> str:
    """A name from the file, safe for a one-line message: printable, bounded, quoted."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return repr(cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "...")


class _Walk:
    def __init__(self, names: BuiltinNames, tolerate_discarded: bool) -> None:
        self.names = names
        self.tolerate_discarded = tolerate_discarded

    def discarded(self, key: Any) -> bool:
        return self.tolerate_discarded and isinstance(key, str) and _DISCARDED.search(key) is not None

    def node(self, node: Any, layer: Where | None, key: str | None, depth: int) -> None:
        if depth > MAX_CONFIG_DEPTH:
            self.refuse(layer, f"nests its config more than {MAX_CONFIG_DEPTH} levels deep")
        if isinstance(node, list):
            for item in node:
                self.node(item, layer, key, depth + 1)
            return
        if not isinstance(node, dict):
            return
        if "class_name" in node:
            layer = self.object(node, layer, key)
        self.lambda_keys(node, layer)
        for child_key, value in node.items():
            if depth == 0 and child_key == "compile_config":
                continue  # every loader here runs with compile=False: never deserialized
            if isinstance(value, str):
                self.named_function(child_key, value, layer)
            self.node(value, layer, str(child_key), depth + 1)

    # --- one object: {"class_name": ..., "config": ..., "module": ..., "registered_name": ...}
    def object(self, node: dict, layer: Where | None, key: str | None) -> Where | None:
        class_name = node["class_name"]
        if not isinstance(class_name, str):
            self.refuse(layer, f"has a class_name that is not a name ({type(class_name).__name__})")
        inner = node.get("config")
        if class_name in _VALUE_MARKERS:
            if class_name in ("__tensor__", "__numpy__") and isinstance(inner, dict) \
                    and str(inner.get("dtype")) not in _PLAIN_DTYPES:
                self.refuse(layer, f"holds an array of dtype {_shown(inner.get('dtype'))}, not a plain number type")
            return layer
        if class_name == _BYTECODE_MARKER:
            self.bytecode(layer, key)
        if class_name == "function":
            self.function_reference(node, layer, key)
            return layer
        named = isinstance(inner, dict) and "name" in inner and key in _LAYER_KEYS
        this = (inner["name"], class_name, "model" if key is None else "layer") if named else None
        where = this or layer
        what = f"its {key} is the class {_shown(class_name)}" if this is None and key else None
        module = node.get("module")
        if module is not None and not _is_keras_module(module):
            self.refuse(where, f"names the Python module {_shown(module)}, outside Keras: loading it would import "
                               f"that module", what)
        if class_name in _REFUSED_BUILTINS:
            self.refuse(where, _REFUSED_BUILTINS[class_name], what)
        registered = node.get("registered_name")
        if registered is not None and registered != class_name and (
                not isinstance(registered, str) or ">" in registered or registered not in self.names.classes):
            self.refuse(where, f"is registered as {_shown(registered)}, a custom object outside Keras", what)
        if class_name not in self.names.classes and not self.discarded(key):
            self.refuse(where, "is not a class built into Keras: it needs custom code to load", what)
        if class_name in ("TFOpLambda", "SlicingOpLambda") and isinstance(inner, dict):
            self.tf_operation(inner.get("function"), where)
        if class_name == "Lambda" and isinstance(inner, dict):
            self.lambda_layer(inner, where)
        if class_name.endswith(("Lookup", "TextVectorization")) and isinstance(inner, dict) \
                and isinstance(inner.get("vocabulary"), str):
            self.refuse(where, "reads its vocabulary from a file path the model names")
        return where

    def function_reference(self, node: dict, layer: Where | None, key: str | None) -> None:
        # Keras 3's reference to a function by name: one of its built-in activations, initializers,
        # regularizers or constraints (what Keras's "builtins" lookup finds), nothing else.
        name, module = node.get("config"), node.get("module")
        allowed = frozenset().union(*self.names.functions.values())
        if not isinstance(name, str) or name not in allowed or (
                module is not None and module != "builtins" and not _is_keras_module(module)):
            self.refuse(layer, f"calls the Python function {_shown(_dotted(module, name))}"
                               f"{f' as its {key}' if key else ''}, which is not one of Keras's built-in functions")
        registered = node.get("registered_name")
        if registered not in (None, "function", name):
            self.refuse(layer, f"calls a function registered as {_shown(registered)}, a custom object outside Keras")

    # --- Lambda layers: Keras 2 stores the function in the layer's own keys -----------------
    def lambda_layer(self, inner: dict, where: Where | None) -> None:
        function, function_type = inner.get("function"), inner.get("function_type")
        if isinstance(function, list) or function_type == "lambda":
            self.bytecode(where, None)
        if function_type is None:
            if function is not None and not isinstance(function, dict):
                self.refuse(where, "has a function that is neither a built-in name nor a Keras 3 reference")
            return  # Keras 3: a {"class_name": ...} reference, checked as the walk reaches it
        if function_type != "function":
            self.refuse(where, f"has a function of type {_shown(function_type)}, not a named built-in")
        module = inner.get("module")
        if not isinstance(function, str) or function not in self.names.functions["activation"] or (
                module is not None and not _is_keras_module(module)):
            self.refuse(where, f"calls the Python function {_shown(_dotted(module, function))}, which is not one of "
                               f"Keras's built-in functions")
        if inner.get("output_shape_type") not in (None, "raw"):
            self.refuse(where, f"computes its output shape with a Python function "
                               f"({_shown(inner.get('output_shape_type'))})")

    def lambda_keys(self, node: dict, layer: Where | None) -> None:
        # Lambda's keys, and Keras 1's Merge mode: marshalled code under any class name.
        for key in ("function_type", "output_shape_type", "mode_type"):
            if node.get(key) == "lambda":
                self.bytecode(layer, key)

    def tf_operation(self, function: Any, where: Where | None) -> None:
        if isinstance(function, str) and re.fullmatch(r"[A-Za-z_][\w.]*", function) and (
                function.startswith(_TF_OP_NAMESPACES) or function in _TF_ARRAY_OPS):
            return
        self.refuse(where, f"calls the TensorFlow function {_shown(f'tf.{function}')}, which is not a math or "
                           f"array operation")

    def named_function(self, key: Any, value: str, layer: Where | None) -> None:
        for kind, pattern in _NAME_KINDS:
            if isinstance(key, str) and pattern.search(key):
                if value not in self.names.functions[kind] and not self.discarded(key):
                    self.refuse(layer, f"uses the {kind} {_shown(value)}, which is not one of Keras's built-in "
                                       f"{kind}s")
                return

    # --- refusals ---------------------------------------------------------------------------
    def bytecode(self, layer: Where | None, key: str | None) -> None:
        place = f" in its {key}" if key and key not in ("function", "function_type") else ""
        self.refuse(layer, f"holds Python bytecode{place}, which would run when the model is loaded")

    @staticmethod
    def refuse(layer: Where | None, problem: str, what: str | None = None) -> None:
        subject = f"{layer[2]} {_shown(layer[0])} ({_shown(layer[1])[1:-1]})" if layer else "the model's config"
        raise ModelCodeRefused(f"{subject}: {what}, which {problem}" if what else f"{subject} {problem}")


def _is_keras_module(module: Any) -> bool:
    return isinstance(module, str) and re.fullmatch(r"(keras|tf_keras)(\.[A-Za-z_]\w*)*", module) is not None


def _dotted(module: Any, name: Any) -> str:
    return f"{module}.{name}" if module else str(name)


# --- the libraries' own lists of built-ins ----------------------------------------------------
@functools.lru_cache(maxsize=2)
def builtin_names(with_tf_keras: bool) -> BuiltinNames:
    """Keras 3's built-ins (and tf_keras's with `with_tf_keras`), from the libraries' own modules
    and lookup tables: what their deserializers resolve without custom objects."""
    import keras

    classes: set[str] = {"Model", "Sequential", "Functional"}
    functions: dict[str, set[str]] = {kind: set() for kind, _ in _NAME_KINDS}
    libraries = [("keras", keras)] + ([("tf_keras", _tf_keras())] if with_tf_keras else [])
    for package, lib in libraries:
        for namespace in ("layers", "models", "initializers", "regularizers", "constraints", "activations",
                          "dtype_policies", "quantizers", "mixed_precision"):
            module = getattr(lib, namespace, None)
            if module is not None:
                classes.update(name for name, obj in _public(module) if inspect.isclass(obj))
        for kind in functions:
            functions[kind].update(name for name, obj in _public(getattr(lib, f"{kind}s")) if callable(obj))
            # the names a string may give: the lookup table (Keras 3) or the module's own
            # definitions (tf_keras), aliases such as "uniform" or "maxnorm" included
            source = importlib.import_module(f"{package}.src.{kind}s")
            table = getattr(source, "ALL_OBJECTS_DICT", None)
            functions[kind].update(table if table else (name for name, obj in _public(source)
                                                        if callable(obj) and getattr(obj, "__module__", None)
                                                        == source.__name__))
    classes.update(_keras3_operations())
    if with_tf_keras:
        classes.update(_tf_keras_graph_layers())
        functions["initializer"].update(_tf_keras_initializer_names())
    return BuiltinNames(frozenset(classes), {kind: frozenset(names) for kind, names in functions.items()})


def _public(module: Any) -> Iterable[tuple[str, Any]]:
    for name in dir(module):
        if not name.startswith("_") and name not in _NOT_OBJECTS:
            yield name, getattr(module, name)


def _tf_keras() -> Any:
    import tf_keras

    return tf_keras


def _keras3_operations() -> set[str]:
    # A Keras 3 functional graph stores keras.ops calls (x * 2, ops.relu) as their Operation classes.
    from keras.src.ops.operation import Operation

    names = set()
    for submodule in ("core", "image", "linalg", "math", "nn", "numpy", "einops"):
        try:
            module = importlib.import_module(f"keras.src.ops.{submodule}")
        except ImportError:
            continue
        names.update(name for name, obj in vars(module).items()
                     if inspect.isclass(obj) and issubclass(obj, Operation) and obj.__module__ == module.__name__)
    return names - _CALLABLE_OPS


def _tf_keras_graph_layers() -> set[str]:
    # Functional, Sequential and the layers tf_keras records TensorFlow calls with: in its layer
    # registry, not in tf_keras.layers.
    from tf_keras.src.layers import serialization

    serialization.populate_deserializable_objects()
    registry = serialization.LOCAL.ALL_OBJECTS
    return {name for name in ("Functional", "Sequential", "Model", "TFOpLambda", "SlicingOpLambda") if name in registry}


def _tf_keras_initializer_names() -> set[str]:
    from tf_keras.src import initializers

    initializers.populate_deserializable_objects()
    return set(initializers.LOCAL.ALL_OBJECTS)
