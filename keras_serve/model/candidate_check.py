"""A candidate model is checked in a child process, within a memory and a time budget.

`check_candidate(path, config, ...)` runs keras_serve/model/candidate_child.py in a new Python
process that loads the file with the server's settings, answers the probe images
(keras_serve/model/probe_images.py: every score finite and in [0, 1], a softmax summing to 1),
and measures the model: the fastest of 7 passes over one image, and the peak memory of a process
that imports TensorFlow, loads the model and answers a batch (what a server process needs). The child may take CANDIDATE_MEMORY_MB on top of TensorFlow and
CANDIDATE_TIMEOUT_S after TensorFlow is imported; past either it is killed or fails, and the
candidate is refused. A model file that allocates 22 GB or never finishes costs that child,
never the process that serves: with one server process, serving continues throughout.

With `baseline` (the served model's file) the candidate is also compared with the served
model, measured the same way: more than CANDIDATE_MAX_SLOWDOWN times slower per image, or more
than CANDIDATE_MAX_MEMORY_GROWTH times the memory, is refused with both numbers, unless the
caller passes `guard_ratios=False` (the CLI's --force; never HTTP). Differences under
MIN_SLOWER_MS / MIN_MORE_MB never refuse: on a busy machine a 1 ms model can time at 3 ms.

Refusals raise CandidateRefused and name the file as published, never a temporary path.
A version that passed is noted in the shared store under `settings_digest(config)`
(ModelRegistry.record_check), so every server process and replica with the same settings loads
it without checking it again: with the default settings a promotion is checked once, where it
is published or promoted, not once more in each process while it serves.
Results are kept per file content and settings, so a version checked at publish is not
measured again at promote, nor a served model at every candidate.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from keras_serve.errors import CandidateRefused
from keras_serve.model.engines import file_sha256

log = logging.getLogger(__name__)

# The settings the child loads with: the server's, so it sees what a server would.
LOAD_SETTINGS = ("LABELS", "SCALING", "ARCH", "MAX_PIXELS", "ENGINE", "WORKERS",
                 "MODEL_MAX_WEIGHT_BYTES", "TRUST_MODEL_CODE")  # file_safety's refusals, as the server's
STARTUP_LIMIT_S = 120.0  # to import TensorFlow, before the candidate's own time starts
MEASURED_BATCH = 8  # the batch whose peak memory is measured (the server warms up on 1 and 8)
MIN_SLOWER_MS = 10.0
MIN_MORE_MB = 64.0
KEPT_RESULTS = 32
# Never handed to the child: it reads the model file it is given, nothing else of the server's.
SECRET_ENVIRONMENT = re.compile(r"^(KERAS_SERVE_|AWS_)|TOKEN|SECRET|PASSWORD|CREDENTIAL|KEY", re.IGNORECASE)

_one_at_a_time = threading.Lock()  # two checks at once would need twice the memory budget
_results: OrderedDict[tuple, "Measurement"] = OrderedDict()


@dataclass(frozen=True)
class Measurement:
    labels: list[str]
    latency_ms: float   # the fastest of a few passes over one image
    memory_mb: float    # peak memory of a process that loads the model and answers a batch of MEASURED_BATCH
    engine: str


@dataclass(frozen=True)
class Budget:
    memory_mb: float
    timeout_s: float
    max_slowdown: float
    max_memory_growth: float
    probe_dir: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Budget":
        return cls(float(config.get("CANDIDATE_MEMORY_MB") or 4096), float(config.get("CANDIDATE_TIMEOUT_S") or 120),
                   float(config.get("CANDIDATE_MAX_SLOWDOWN") or 3.0),
                   float(config.get("CANDIDATE_MAX_MEMORY_GROWTH") or 3.0), config.get("CANDIDATE_PROBE_DIR"))


def settings_digest(config: Mapping[str, Any]) -> str:
    """16 hex digits naming what a check's outcome depends on: the loading settings and the
    budgets (not the engine, which each process builds and compares with TensorFlow itself)."""
    budget = Budget.from_config(config)
    named = {key: config.get(key) for key in LOAD_SETTINGS if key not in ("ENGINE", "WORKERS")}
    named.update(memory_mb=budget.memory_mb, timeout_s=budget.timeout_s, probe_dir=budget.probe_dir)
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_candidate(path: str | Path, config: Mapping[str, Any], served_labels: Sequence[str] | None, *,
                    name: str | None = None, baseline: str | Path | None = None,
                    guard_ratios: bool = True) -> Measurement:
    """Check `path` in a child process (see the module docstring); raises CandidateRefused.
    `name`: what the file is shown as (default: its own name)."""
    path = Path(path)
    name = name or path.name
    budget = Budget.from_config(config)
    candidate = _measure(path, config, budget, name, served_labels, True)
    if guard_ratios and baseline is not None and Path(baseline).is_file():
        try:
            served = _measure(Path(baseline), config, budget, Path(baseline).name, None, False)
        except CandidateRefused as exc:  # the served model itself cannot be measured: nothing to compare with
            log.warning("the served model could not be measured, so candidate %s is not compared with it: %s",
                        name, exc.message)
        else:
            _compare(name, candidate, served, budget)
    return candidate


def _compare(name: str, candidate: Measurement, served: Measurement, budget: Budget) -> None:
    problems = []
    if candidate.latency_ms > budget.max_slowdown * served.latency_ms and \
            candidate.latency_ms - served.latency_ms > MIN_SLOWER_MS:
        problems.append(f"it answers one image in {candidate.latency_ms:.3g} ms, "
                        f"{candidate.latency_ms / max(served.latency_ms, 1e-3):.1f} times the served model's "
                        f"{served.latency_ms:.3g} ms (CANDIDATE_MAX_SLOWDOWN: {budget.max_slowdown:g})")
    if candidate.memory_mb > budget.max_memory_growth * served.memory_mb and \
            candidate.memory_mb - served.memory_mb > MIN_MORE_MB:
        problems.append(f"a process serving it takes {candidate.memory_mb:.0f} MB to load it and answer "
                        f"{MEASURED_BATCH} images, "
                        f"{candidate.memory_mb / max(served.memory_mb, 1.0):.1f} times the served model's "
                        f"{served.memory_mb:.0f} MB (CANDIDATE_MAX_MEMORY_GROWTH: {budget.max_memory_growth:g})")
    if problems:
        raise CandidateRefused(f"{name} would make every server worse: {'; '.join(problems)}. "
                               "`python -m keras_serve.model publish --force` publishes it anyway")


def _measure(path: Path, config: Mapping[str, Any], budget: Budget, name: str,
             served_labels: Sequence[str] | None, validate: bool) -> Measurement:
    settings = tuple((key, str(config.get(key))) for key in LOAD_SETTINGS)
    key = (file_sha256(path), validate, tuple(served_labels) if served_labels is not None else None,
           settings, budget.memory_mb, budget.probe_dir)
    with _one_at_a_time:
        if key in _results:
            _results.move_to_end(key)
            return _results[key]
        request = {"path": str(path), "name": name, "validate": validate,
                   "served_labels": list(served_labels) if served_labels is not None else None,
                   "config": {k: config.get(k) for k in LOAD_SETTINGS}, "memory_mb": budget.memory_mb,
                   "batch": MEASURED_BATCH, "probe_dir": budget.probe_dir}
        started = time.perf_counter()
        answer = _run_child(request, budget, name)
        if "ok" not in answer:
            raise CandidateRefused(_scrub(answer.get("refused", "refused"), path, name))
        measurement = Measurement(answer["labels"], float(answer["latency_ms"]), float(answer["peak_mb"]),
                                  str(answer["engine"]))
        log.info("model %s checked in a child process in %.1f s: %.3g ms per image, %.0f MB, engine %s",
                 name, time.perf_counter() - started, measurement.latency_ms, measurement.memory_mb,
                 measurement.engine)
        _results[key] = measurement
        while len(_results) > KEPT_RESULTS:
            _results.popitem(last=False)
        return measurement


def _run_child(request: dict[str, Any], budget: Budget, name: str) -> dict[str, Any]:
    """The child's last answer ({"ok": ...} or {"refused": why}); a budget exceeded is a refusal."""
    environment = {k: v for k, v in os.environ.items() if not SECRET_ENVIRONMENT.search(k)}
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    package_root = str(Path(__file__).resolve().parents[2])  # importable however the server was started
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen([sys.executable, "-m", "keras_serve.model.candidate_child"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, env=environment)
        lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True,
                         name="candidate-check-reader").start()
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps(request).encode())
            child.stdin.close()
            answer = _follow(child, lines, budget, name)
        except BaseException:
            _stop(child)
            _log_stderr(stderr, name)
            raise
        _stop(child)  # it has answered; what it would still do (TensorFlow's teardown) is not needed
        return answer


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


def _follow(child: subprocess.Popen, lines: "queue.Queue[dict[str, Any] | None]", budget: Budget,
            name: str) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    stage, ready = "starting", False
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            child.kill()
            if not ready:
                raise CandidateRefused(f"{name} was not checked: the check process did not start within "
                                       f"{STARTUP_LIMIT_S:g} s; try again") from None
            raise CandidateRefused(f"{name} took longer than CANDIDATE_TIMEOUT_S ({budget.timeout_s:g} s) "
                                   f"to check; it was stopped while {stage}") from None
        if line is None:  # the child ended without a last answer: killed, or crashed
            code = child.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            raise CandidateRefused(f"{name} ended its check process ({how}) while {stage}, under a memory "
                                   f"budget of {budget.memory_mb:g} MB (CANDIDATE_MEMORY_MB): a model that "
                                   "needs more memory than its budget ends this way")
        if line.get("ready"):
            ready, stage = True, "loading"
            deadline = time.monotonic() + budget.timeout_s
        elif "stage" in line:
            stage = str(line["stage"])
        elif "memory" in line:
            raise CandidateRefused(f"{name} needs more memory than CANDIDATE_MEMORY_MB ({budget.memory_mb:g} MB) "
                                   f"allows: {line['memory']} (while {stage})")
        else:
            return line


def _read_lines(stream: IO[bytes], lines: "queue.Queue[dict[str, Any] | None]") -> None:
    for raw in stream:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if isinstance(message, dict):
            lines.put(message)
    lines.put(None)


def _log_stderr(stderr: IO[bytes], name: str) -> None:
    stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, stderr.tell() - 2000))
    tail = stderr.read().decode("utf-8", "replace").strip()
    log.warning("the check process of %s refused it; its last output: %s", name, tail[-2000:] or "(none)")


def _scrub(message: str, path: Path, name: str) -> str:
    """`message` naming the file as published: never the folder it was checked in."""
    message = message.replace(str(path), name).replace(str(path.parent) + os.sep, "")
    if path.name != name:
        message = re.sub(rf"\b{re.escape(path.name)}\b", name, message)
    temporary, sep = re.escape(tempfile.gettempdir().rstrip(os.sep)), re.escape(os.sep)
    return re.sub(rf"{temporary}{sep}(?:[^\s'\"]*{sep})?([^{sep}\s'\"]+)", r"\1", message)
