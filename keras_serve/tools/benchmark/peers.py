"""This server side by side with the peer servers, one load client for all, one table of ratios.

    flock -x /work/timing.lock .venv/bin/python -m keras_serve.tools.benchmark --peers fastapi,flask,litserve,bento,pytriton \\
        [--ours "2 workers=--workers 2" --ours "1 process="] [-c 1,8,32,64] [-n 1000] [--repeats 2]

The peers are the set-ups in ../shared/peers (README there): each runs from its own virtual
environment under $PEERS_WORK (default ./peers-work, made by ../shared/peers/setup.sh), as its
service file says, on a free port, serving the same ONNX file (peers-work/model.onnx) with the
same preprocessing. Every system, ours included, is driven by the same client
(../shared/peers/loadgen.py: keep-alive connections, a fresh multipart boundary per request,
warm-up window, whole-machine CPU per request) with the same real photos. The systems are
interleaved: repeat 1 runs every system once, then repeat 2, ...; the table shows medians.

Before the load, the in-process pipeline limit (decode + resize + scale + forward of the same
photos on every core, no HTTP; limits.measure_pipeline) is measured in a child process, so
the table can say what fraction of the machine's limit every server reaches.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from keras_serve.settings import DEFAULT_MODEL_PATH, PROJECT_ROOT
from keras_serve.tools.ports import free_port
from keras_serve.tools.benchmark.stats import format_table, parse_int_list

# ../shared beside the checkout (a worktree one level deeper finds it one level up).
SHARED = next((d for d in (PROJECT_ROOT.parent / "shared", PROJECT_ROOT.parent.parent / "shared") if d.is_dir()),
              PROJECT_ROOT.parent / "shared")
PEERS_DIR = Path(os.environ.get("PEERS_DIR", SHARED / "peers"))
IMAGES = Path(os.environ.get("PEER_IMAGES", SHARED / "data" / "cats_vs_dogs" / "validation"))
PEER_NAMES = ("fastapi", "flask", "litserve", "bento", "pytriton")
BASELINE = "fastapi"  # the 13-line FastAPI app: the bar every ratio is against
BATCHING_PEERS = ("litserve", "bento", "pytriton")
DEFAULT_OURS = ("keras-serve, 2 workers=--workers 2",)


@dataclass
class System:
    """One server to start, wait for and load: a command line, where to POST, how to check it is up."""

    name: str
    command: list[str]
    cwd: Path
    path: str           # the classify endpoint
    field: str          # the loadgen field ("file", "images", "kserve:image")
    health: str         # GET answers 200 once it serves
    env: dict[str, str] = field(default_factory=dict)
    is_peer: bool = True
    prepare: list[str] | None = None  # run to completion before the server starts (ours: a promotion)


def peer_systems(work: Path, onnx: Path, port: int) -> dict[str, System]:
    """The peers as ../shared/peers/README.md runs them, each at its best measured set-up."""
    env = {"PEER_ONNX": str(onnx), "PEER_IMAGES": str(IMAGES)}
    host = ["--host", "127.0.0.1", "--port", str(port)]
    return {
        "fastapi": System("FastAPI + uvicorn, 2 workers", [str(work / "fastapi-venv/bin/uvicorn"), "app:app", *host,
                          "--workers", "2", "--no-access-log"], PEERS_DIR / "fastapi_ort", "/predict", "file",
                          "/healthz", {**env, "ORT_THREADS": "1"}),
        "flask": System("Flask + granian, 2 workers", [str(work / "flaskgr-venv/bin/granian"), "--interface", "wsgi",
                        *host, "--workers", "2", "--blocking-threads", "1", "app:app"], PEERS_DIR / "flask_granian",
                        "/predict", "file", "/healthz", {**env, "ORT_THREADS": "1"}),
        "litserve": System("LitServe, batching, 2 workers", [str(work / "litserve-venv/bin/python"), "server.py",
                           "--port", str(port)], PEERS_DIR / "litserve", "/predict", "file", "/health",
                           {**env, "LS_WORKERS": "2"}),
        "bento": System("BentoML, batching, 2 workers", [str(work / "bento14-venv/bin/bentoml"), "serve",
                        "service:CatsVsDogsOnnx", *host], PEERS_DIR / "bento_onnx", "/classify", "images",
                        "/readyz", {**env, "BENTO_WORKERS": "2", "BENTOML_HOME": str(work / "bentoml_home"),
                                    "BENTOML_DO_NOT_TRACK": "true"}),
        "pytriton": System("PyTriton, dynamic batching", [str(work / "pytriton-venv/bin/python"), "server.py",
                           "--port", str(port)], PEERS_DIR / "pytriton", "/v2/models/catsdogs/infer",
                           "kserve:image", "/v2/models/catsdogs/ready", env),
    }


# The store is made as a server's first start makes it (the model CLI never creates one), then
# the file is promoted with the model CLI's own checks.
PROMOTE_IN_FRESH_STORE = """import sys
from keras_serve import settings
from keras_serve.storage.uploads import UploadStore
from keras_serve.model.__main__ import main
UploadStore.from_config(settings.resolve({"UPLOAD_DIR": sys.argv[1]})).close()
sys.exit(main(["promote", sys.argv[2], "--upload-dir", sys.argv[1], "--by", "benchmark"]))
"""


def our_system(label: str, args: Sequence[str], port: int, upload_dir: Path) -> System:
    """app.py with `args`; leading NAME=VALUE words are its environment (KERAS_SERVE_THREADS=8 --workers 2).
    `--promote FILE` is not app.py's: FILE is promoted in the fresh store first, with
    `python -m keras_serve.model promote` (checked like any version), so that app.py serves it as
    a promoted version, the way a user switches to the int8 variant."""
    args = list(args)
    env = {}
    while args and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", args[0]):
        name, value = args.pop(0).split("=", 1)
        env[name] = value
    prepare = None
    if "--promote" in args:
        at = args.index("--promote")
        if at + 1 >= len(args):
            raise ValueError("--promote needs a model file")
        promoted = args[at + 1]
        del args[at:at + 2]
        prepare = [sys.executable, "-c", PROMOTE_IN_FRESH_STORE, str(upload_dir), str(PROJECT_ROOT / promoted)]
    command = [sys.executable, str(PROJECT_ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
               "--upload-dir", str(upload_dir), *args]
    return System(label, command, PROJECT_ROOT, "/file/", "file", "/readyz", env, is_peer=False, prepare=prepare)


# ---------------------------------------------------------------------------------------
# Running one system
# ---------------------------------------------------------------------------------------

def load_loadgen():
    """../shared/peers/loadgen.py as a module: the one client for every system."""
    spec = importlib.util.spec_from_file_location("peer_loadgen", PEERS_DIR / "loadgen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no 200 from {url} within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the system's process group (its workers too), SIGKILL after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_system(system: System, port: int, loadgen, uploads, levels: Sequence[int], n: int,
               log_path: Path, startup_timeout_s: float, warmup: int | None = None) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(system.command, cwd=system.cwd, env={**os.environ, **system.env},
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            wait_until_up(url + system.health, process, startup_timeout_s)
            return [loadgen.run_level(url + system.path, system.field, uploads, c, n, process.pid, warmup)
                    for c in levels]
        finally:
            stop(process)


# ---------------------------------------------------------------------------------------
# The table (pure functions: tests/test_peer_table.py)
# ---------------------------------------------------------------------------------------

def medians(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> dict[str, dict[int, dict[str, float]]]:
    """{system: [repeat: [level result]]} -> {system: {c: {req_s, p99_ms, cpu_ms_per_req, errors}}},
    medians over the repeats (errors: the sum)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, repeats in runs.items():
        by_level: dict[int, list[Mapping[str, Any]]] = {}
        for repeat in repeats:
            for level in repeat:
                by_level.setdefault(int(level["c"]), []).append(level)
        out[name] = {c: {"req_s": statistics.median(r["req_s"] for r in rows),
                         "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                         "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in rows),
                         "server_cpu_ms_per_req": statistics.median(r.get("server_cpu_ms_per_req", float("nan"))
                                                                    for r in rows),
                         "errors": float(sum(r["errors_total"] for r in rows))}
                     for c, rows in sorted(by_level.items())}
    return out


def best_peer(table: Mapping[str, Mapping[int, Mapping[str, float]]], peers: Sequence[str], c: int) -> str | None:
    """The peer with the most req/s at level c (None if no peer ran)."""
    candidates = [p for p in peers if c in table.get(p, {})]
    return max(candidates, key=lambda p: table[p][c]["req_s"]) if candidates else None


def ratio_rows(table: Mapping[str, Mapping[int, Mapping[str, float]]], peers: Sequence[str], levels: Sequence[int],
               baseline: str | None, pipeline_limit: float | None, limit_level: int = 32) -> list[list[Any]]:
    """One row per system: req/s per level, p99 at the top level, the server's own CPU ms per
    request at `limit_level` (its process tree: on a shared machine the whole machine's CPU
    says little),
    then req/s as a ratio to the best peer (each level: the lowest of them), to `baseline` at
    the two top levels, and to the pipeline limit at `limit_level`. NaN where not measured."""
    nan = float("nan")
    top = max(levels)
    rows = []
    for name, by_level in table.items():
        row: list[Any] = [name]
        row += [by_level.get(c, {}).get("req_s", nan) for c in levels]
        row.append(by_level.get(top, {}).get("p99_ms", nan))
        row.append(by_level.get(limit_level, {}).get("server_cpu_ms_per_req", nan))
        row.append(int(sum(v["errors"] for v in by_level.values())))
        to_best = []
        for c in levels:
            others = [p for p in peers if p != name]
            best = best_peer(table, others, c)
            if best is not None and c in by_level and table[best][c]["req_s"] > 0:
                to_best.append(by_level[c]["req_s"] / table[best][c]["req_s"])
        row.append(min(to_best) if to_best else nan)
        for c in (levels[-2] if len(levels) > 1 else top, top):
            base = table.get(baseline or "", {}).get(c)
            row.append(by_level[c]["req_s"] / base["req_s"] if base and c in by_level and base["req_s"] > 0 else nan)
        limit = by_level.get(limit_level, {}).get("req_s")
        row.append(limit / pipeline_limit if limit and pipeline_limit else nan)
        rows.append(row)
    return rows


def ratio_headers(levels: Sequence[int], baseline: str | None, limit_level: int = 32) -> list[str]:
    top = max(levels)
    second = levels[-2] if len(levels) > 1 else top
    return (["system", *(f"c={c}" for c in levels), f"p99 ms c={top}", f"server CPU ms/req c={limit_level}", "errors",
             "min x best other peer", f"x {baseline or 'baseline'} c={second}", f"x {baseline or 'baseline'} c={top}",
             f"x pipeline c={limit_level}"])


def render(table, names: Mapping[str, str], peers: Sequence[str], levels: Sequence[int], baseline: str | None,
           pipeline_limit: float | None) -> str:
    rows = ratio_rows(table, peers, levels, baseline, pipeline_limit)
    for row in rows:
        row[0] = names.get(row[0], row[0])
    return format_table(ratio_headers(levels, baseline), rows)


# ---------------------------------------------------------------------------------------
# The pipeline limit, in a child process
# ---------------------------------------------------------------------------------------

def pipeline_limit_child(out: Path, seconds: float) -> None:
    from keras_serve.model.served_model import ServedModel
    from keras_serve.tools.benchmark.limits import measure_pipeline

    jpegs = [p.read_bytes() for p in sorted(IMAGES.glob("*/*.jpg"))[:200]]
    model = ServedModel.load(DEFAULT_MODEL_PATH)
    cores = len(os.sched_getaffinity(0))
    result = measure_pipeline(model, jpegs, 8, seconds, cores)
    out.write_text(json.dumps(result))


def measure_pipeline_limit(scratch: Path, seconds: float) -> float:
    out = scratch / "pipeline.json"
    subprocess.run([sys.executable, "-m", "keras_serve.tools.benchmark.peers", "--_pipeline-out", str(out),
                    "--_pipeline-seconds", str(seconds)], cwd=PROJECT_ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["images_per_s"])


# ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m keras_serve.tools.benchmark --peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default=",".join(PEER_NAMES), help="comma list of " + ", ".join(PEER_NAMES))
    p.add_argument("--ours", action="append", metavar="LABEL=ARGS",
                   help=f"this server with these app.py options (repeatable; default {DEFAULT_OURS[0]!r})")
    p.add_argument("-c", "--concurrency", type=parse_int_list, default=[1, 8, 32, 64])
    p.add_argument("-n", "--requests", type=int, default=1000, help="measured requests per level")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (medians)")
    p.add_argument("--warmup", type=int, help="unmeasured answers per level (default: loadgen's max(200, 5c))")
    p.add_argument("--pipeline-seconds", type=float, default=8.0, help="0: skip the pipeline limit")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--json", type=Path, help="write every level result here")
    p.add_argument("--_pipeline-out", dest="pipeline_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_pipeline-seconds", dest="pipeline_child_seconds", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pipeline_out:
        pipeline_limit_child(args.pipeline_out, args.pipeline_child_seconds)
        return 0
    work = Path(os.environ.get("PEERS_WORK", PROJECT_ROOT / "peers-work")).resolve()
    onnx = Path(os.environ.get("PEER_ONNX", work / "model.onnx")).resolve()
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEER_NAMES))
    if unknown:
        print(f"error: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)}", file=sys.stderr)
        return 2
    if peers and not onnx.is_file():
        print(f"error: {onnx} missing: run `bash ../shared/peers/setup.sh` first", file=sys.stderr)
        return 2
    ours = [spec.split("=", 1) for spec in (args.ours or DEFAULT_OURS)]

    def on_sigterm(signum: int, frame: Any) -> None:  # `kill` or `timeout`: stop the system, print the table
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    loadgen = load_loadgen()
    loadgen.IMAGES = str(IMAGES)
    uploads = loadgen.load_uploads()
    scratch = Path(tempfile.mkdtemp(prefix="peers-"))
    uploads_root = PROJECT_ROOT / "uploads"
    uploads_root.mkdir(exist_ok=True)
    names: dict[str, str] = {}
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    # Our rows' stores are deleted when the run ends, not after each row. On ext4 without a
    # journal, the kernel skips inodes freed in the last minutes when it makes a file
    # (recently_deleted in fs/ext4/ialloc.c): right after a row's thousands of uploads were
    # deleted, making a file cost 0.14-0.28 ms instead of 0.02 (measured here), and the next of
    # our rows paid it on every upload while the peers, which store nothing, never do.
    stores: list[Path] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        limit = None
        if args.pipeline_seconds > 0:
            log("measuring the in-process pipeline limit ...")
            limit = measure_pipeline_limit(scratch, args.pipeline_seconds)
            log(f"pipeline limit {limit:.0f} images/s")
        for repeat in range(args.repeats):
            for key in [label for label, _ in ours] + peers:
                port = free_port("127.0.0.1")
                if key in PEER_NAMES:
                    system = peer_systems(work, onnx, port)[key]
                    if not Path(system.command[0]).exists():
                        log(f"{key}: {system.command[0]} missing, skipped (setup.sh {key})")
                        continue
                else:
                    upload_dir = Path(tempfile.mkdtemp(prefix=".peers-", dir=uploads_root))
                    stores.append(upload_dir)
                    system = our_system(key, dict(ours)[key].split(), port, upload_dir)
                names[key] = system.name if system.is_peer else key
                log(f"repeat {repeat + 1}/{args.repeats}: {names[key]} on port {port}")
                try:
                    if system.prepare:
                        prepared = subprocess.run(system.prepare, cwd=system.cwd, capture_output=True, text=True)
                        if prepared.returncode != 0:
                            raise RuntimeError(f"promoting {system.prepare[-1]} failed: {prepared.stderr[-500:]}")
                    levels = run_system(system, port, loadgen, uploads, args.concurrency, args.requests,
                                        scratch / f"{key.replace(' ', '_').replace('/', '_')}.log",
                                        args.startup_timeout, args.warmup)
                except RuntimeError as exc:
                    log(f"{names[key]}: {exc}; skipped")
                    continue
                for level in levels:
                    log(f"  c={level['c']}: {level['req_s']:.0f} req/s, p99 {level['p99_ms']:.0f} ms, server "
                        f"{level['server_cpu_ms_per_req']:.2f} / machine {level['cpu_ms_per_req']:.2f} CPU ms/req, "
                        f"machine busy {level['machine_busy_pct']:.0f}%, errors {level['errors_total']}")
                runs.setdefault(key, []).append(levels)
    except KeyboardInterrupt:
        log("interrupted; the table covers what finished")
    finally:
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)
    table = medians(runs)
    print(f"\n{started}, {os.cpu_count()} CPUs, {args.requests} requests per level after warm-up, "
          f"{args.repeats} interleaved repeat(s), medians; req/s unless said")
    if limit:
        print(f"in-process pipeline limit (decode + forward on every core, no HTTP): {limit:.0f} images/s")
    print(render(table, names, peers, args.concurrency, BASELINE if BASELINE in table else None, limit))
    if args.json:
        args.json.write_text(json.dumps({"started": started, "pipeline_limit": limit, "names": names, "runs": runs},
                                        indent=1))
    print(f"server logs: {scratch}", file=sys.stderr)
    return 0 if all(v["errors"] == 0 for levels in table.values() for v in levels.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
