"""Engines: what runs a loaded Keras model's forward pass on the CPU.

Keras and TensorFlow always load the file (every Keras era needs them); the forward pass can
then run elsewhere. Measured on the 2-core development VM with the default model (docs/performance.md,
"Performance"), ONNX Runtime and LiteRT both beat TensorFlow's traced `tf.function` with
outputs within 1e-6 of it, so `auto` tries ONNX Runtime, then LiteRT, and keeps TensorFlow
when neither converts or either answers differently (`ServedModel` checks that at start-up).

Each conversion is done once and cached beside the model, `<model dir>/.cache/<sha256 of the
model file>.<input shape>.<engine suffix>`: a changed file has a new hash (and a changed input
size a new shape), so a stale conversion is never read, and the start-up check would catch a
damaged one anyway.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("auto", "tensorflow", "onnxruntime", "litert")
AUTO_ORDER = ("onnxruntime", "litert")  # fastest first, by measurement; TensorFlow is the fallback
ONNX_OPSET = 17


class EngineUnavailable(Exception):
    """This engine cannot run this model; the message says why in one line."""


def usable_cores(root: str | Path = "/") -> int:
    """The CPUs this process may run on: its affinity (taskset, a cpuset), capped by the CPU
    quota of its cgroup (a container's `--cpus`, a pod's CPU limit), rounded down, at least 1.
    A quota of 1.5 CPUs on a 64-core host is 1: one thread per core of host would only be
    throttled. `root`: where /proc and /sys are read from (tests give a fake tree)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: str | Path = "/") -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup and its parents, cgroup v2
    (cpu.max) or v1 (cpu.cfs_quota_us / cpu.cfs_period_us); None where there is none."""
    quotas = []
    for folder in cgroup_folders(root, "cpu"):
        try:
            if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            else:  # v1: -1 for no quota
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):  # no such file at this level, or a format not known: no limit read there
            continue
    return min(quotas, default=None)


def cgroup_folders(root: str | Path, controller: str) -> list[Path]:
    """The cgroup folders whose `controller` limits apply to this process: its own and each
    parent up to the mount point (a limit on a parent binds too), as /proc/self/cgroup names
    them; only the mount point where that path is not visible (a container's own cgroup
    namespace mounts its cgroup there). cgroup v2 first, then v1."""
    base = Path(root) / "sys" / "fs" / "cgroup"
    try:
        lines = (Path(root) / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    folders: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2, one hierarchy for every controller
            mount = base
            if not (mount / "cgroup.controllers").is_file():
                continue  # hybrid: v2 holds no controllers here, v1 does
        elif controller in controllers.split(","):
            mount = next((base / name for name in (controllers, controller) if (base / name).is_dir()), None)
            if mount is None:
                continue
        else:
            continue
        own = mount / path.strip("/")
        # "/..": a cgroup outside this namespace's view; a path not mounted here: a private namespace
        visible = ".." not in Path(path).parts and own.is_dir()
        chain = [own, *own.parents] if visible else [mount]
        folders += [folder for folder in chain if folder.is_relative_to(mount) and folder not in folders]
    if not folders and (base / "cgroup.controllers").is_file():
        folders.append(base)
    return folders


class TensorFlowEngine:
    """A traced `tf.function` called directly: it skips `model.predict`'s per-call set-up,
    which costs more than the forward pass itself at small batches."""

    name = "tensorflow"

    def __init__(self, model: Any, input_shape: tuple[int, ...]) -> None:
        import tensorflow as tf

        signature = [tf.TensorSpec((None, *input_shape), tf.float32)]
        self.forward = tf.function(lambda x: model(x, training=False), input_signature=signature)
        self.version = tf.__version__

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.forward(batch))


class OnnxRuntimeEngine:
    name = "onnxruntime"
    suffix = ".onnx"

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailable(f"onnxruntime is not installed ({exc})") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads would spin for a while after each call, taking the CPU that the
        # request threads need for decoding; measured: spinning off costs nothing at batch 32.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.version = ort.__version__

    @staticmethod
    def convert(model: Any, input_shape: tuple[int, ...]) -> bytes:
        try:
            import tensorflow as tf
            import tf2onnx
        except ImportError as exc:
            raise EngineUnavailable(f"tf2onnx is not installed ({exc})") from None

        @tf.function
        def forward(x):
            return model(x, training=False)

        signature = [tf.TensorSpec((None, *input_shape), tf.float32, name="input")]
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its INFO lines narrate every pass
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=ONNX_OPSET)
        return proto.SerializeToString()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


class LiteRtEngine:
    name = "litert"
    suffix = ".tflite"

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        try:
            import ai_edge_litert
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise EngineUnavailable(f"ai-edge-litert is not installed ({exc})") from None
        self._interpreter = Interpreter(model_content=model_bytes, num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._shape: tuple[int, ...] | None = None
        self.version = getattr(ai_edge_litert, "__version__", "")

    @staticmethod
    def convert(model: Any, input_shape: tuple[int, ...]) -> bytes:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        forward = tf.function(lambda x: model(x, training=False),
                              input_signature=[tf.TensorSpec((None, *input_shape), tf.float32)])
        # Frozen: a function that still reads variables converts to READ_VARIABLE ops, which
        # LiteRT runs with uninitialised values (NaN answers) instead of failing.
        frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
        return tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # The interpreter has one shape at a time; a new batch size costs a re-allocation
        # (docs/performance.md: measured), which the batcher's steady batch sizes make rare.
        if batch.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, batch.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._shape = batch.shape
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch, np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


CONVERTED_ENGINES: dict[str, type] = {"onnxruntime": OnnxRuntimeEngine, "litert": LiteRtEngine}


class LoneInputSplit:
    """One converted engine loaded twice: a lone input runs on every core, a batch on this
    process's share of them.

    With `--workers N` each process's engine gets cores / N threads, right for the batches that
    keep every worker busy under load; a lone request, though, most likely has the machine to
    itself. Measured with 2 workers on 2 cores (docs/performance.md): p50 at one client
    4.3 ms against 5.1 with one thread, and 32 clients unchanged.
    """

    def __init__(self, lone: Any, batched: Any) -> None:
        self.lone, self.batched = lone, batched
        self.name, self.version = batched.name, batched.version
        # Whether this process has other requests in flight (`Generation` says). Then a lone
        # input runs on the process's share too: every worker's passes on every core at once
        # cost ~1 ms of CPU more per request with 2 workers on 2 cores (docs/performance-design.md).
        self.crowded: Callable[[], bool] = lambda: False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return (self.lone if len(batch) == 1 and not self.crowded() else self.batched)(batch)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(model_path: Path, engine: str, input_shape: tuple[int, ...], variant: str | None = None) -> Path:
    """Where the conversion of this model file for this engine is cached: keyed by the file's
    content, the input shape it was converted for (a model with free height and width gets
    its size from the model card, which can change while the file does not), and `variant`,
    whatever else decides the model (the --arch of a weights-only file)."""
    key = f"{file_sha256(model_path)}.{'x'.join(str(n) for n in input_shape)}" + (f".{variant}" if variant else "")
    return Path(model_path).parent / ".cache" / f"{key}{CONVERTED_ENGINES[engine].suffix}"


def converted_bytes(model_path: Path | None, engine: str, convert: Callable[[], bytes],
                    input_shape: tuple[int, ...], variant: str | None = None) -> bytes:
    """The cached conversion, else `convert()` and cache it (best effort: a read-only model
    folder only means converting again at the next start)."""
    if model_path is None:
        return convert()
    path = cache_path(model_path, engine, input_shape, variant)
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = convert()
    try:
        path.parent.mkdir(exist_ok=True)
        # Written whole, then renamed: two servers starting at once never read half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as part:
            part.write(data)
        os.chmod(part.name, 0o644)  # like any file the model folder holds, not private to this user
        os.replace(part.name, path)
    except OSError as exc:
        log.info("conversion for %s not cached (%s); it will be redone at the next start", engine, exc)
    return data


def build_converted(engine: str, model: Any, input_shape: tuple[int, ...], model_path: Path | None,
                    threads: int, variant: str | None = None):
    """A converted engine ready to call, or EngineUnavailable with the reason. `threads` run a
    batch; a lone input gets every usable core (LoneInputSplit) when that is more."""
    cls = CONVERTED_ENGINES[engine]
    try:
        data = converted_bytes(model_path, engine, lambda: cls.convert(model, input_shape), input_shape, variant)
        batched = cls(data, threads)
        cores = usable_cores()
        return LoneInputSplit(cls(data, cores), batched) if cores > threads else batched
    except EngineUnavailable:
        raise
    except Exception as exc:  # a converter or runtime lacking an op fails in its own words
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise EngineUnavailable(f"{type(exc).__name__}: {message}") from None
