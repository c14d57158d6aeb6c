"""The plain-text report: machine, limits, engines, every concurrency level as a ratio to
both limits, the phone photo, memory, and the issue-14 targets met or not."""
from __future__ import annotations

import math
from typing import Any

from keras_serve.tools.benchmark.stats import format_table

# The speed targets, on the default model: 32 clients reach 0.8 of the pipeline limit (0.7
# the floor), one client's p50 stays within 1.3x decode + single forward, a 12 MP photo < 100 ms.
TARGET_PIPELINE_RATIO, FLOOR_PIPELINE_RATIO = 0.8, 0.7
TARGET_C1_RATIO = 1.3
TARGET_PHONE_MS = 100.0


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(what, measured, met) for each target the run can judge."""
    rows: list[tuple[str, str, bool | None]] = []
    levels = {level["concurrency"]: level for level in results.get("http", {}).get("levels", [])}
    c32 = levels.get(32)
    if c32 and "ratio_to_pipeline" in c32:
        ratio = c32["ratio_to_pipeline"]
        verdict = "met" if ratio >= TARGET_PIPELINE_RATIO else ("floor met" if ratio >= FLOOR_PIPELINE_RATIO else "not met")
        rows.append((f"32 clients >= {TARGET_PIPELINE_RATIO} of pipeline limit (floor {FLOOR_PIPELINE_RATIO})",
                     f"{ratio:.2f} ({verdict}), errors {c32['errors_total']}",
                     ratio >= FLOOR_PIPELINE_RATIO and c32["errors_total"] == 0))
    ratio_c1 = results.get("http", {}).get("c1_p50_over_single")
    if ratio_c1 is not None:
        rows.append((f"1 client p50 <= {TARGET_C1_RATIO}x (decode + single forward)", f"{ratio_c1:.2f}x",
                     ratio_c1 <= TARGET_C1_RATIO))
    phone = results.get("phone")
    if phone:
        p50 = phone["latency_ms"]["p50"]
        rows.append((f"12 MP photo, 1 client, p50 < {TARGET_PHONE_MS:.0f} ms", f"{p50:.0f} ms", p50 < TARGET_PHONE_MS))
    return rows


def print_report(results: dict[str, Any]) -> None:
    env, limits, server = results["environment"], results.get("limits"), results["server"]
    print()
    print("=" * 78)
    print(f"machine   {env['cpu_model']}, {env['cpu_count']} cores ({env['cpu_affinity']} usable), "
          f"load avg at start {env['loadavg_start']}")
    print(f"software  Python {env['python']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}, "
          f"Pillow {env['pillow']}, ONNX Runtime {env['onnxruntime']}, LiteRT {env['ai-edge-litert']}")
    print(f"model     {results['model']}")
    print(f"server    {' '.join(server['command'][1:])}")
    print(f"          ready after {server['ready_after_s']:.1f} s; log {server['log']}")
    print(f"images    {results['images']['count']} from {results['images']['source']}, "
          f"mean {results['images']['mean_kb']:.0f} KB")

    if limits:
        engine = limits["engine"]
        print()
        print(f"limits, in-process, no HTTP (child process, before the server started; engine "
              f"{engine['name']} {engine['version']}, as the server will use)")
        print(format_table(["batch", "images/s", "ms/batch", "CPU ms/img"],
                           [[r["batch"], r["images_per_s"], r["ms_per_batch"], r["cpu_ms_per_image"]]
                            for r in limits["batched"]]))
        single = limits["single"]
        print(f"raw forward limit: {limits['best_images_per_s']:.1f} images/s at batch {limits['best_batch']}")
        print(f"pipeline limit:    {limits['pipeline_images_per_s']:.1f} images/s (decode+resize+scale on "
              f"{limits['pipeline'][0]['threads']} threads overlapped with batched forward: "
              + ", ".join(f"batch {p['batch']} {p['images_per_s']:.1f}/s at {p['cpu_ms_per_image']:.2f} CPU ms"
                          for p in limits["pipeline"]) + ")")
        print(f"single image (median of {single['runs']}): decode+preprocess {single['decode_ms_median']:.2f} ms "
              f"+ forward {single['forward_ms_median']:.2f} ms = {single['total_ms_median']:.2f} ms")
        if limits.get("engines"):
            print()
            print("engines (same model, same process; difference and label changes against TensorFlow)")
            rows = []
            for row in limits["engines"]:
                if not row["used"]:
                    rows.append([row["engine"], row["version"], "-", "-", "-", "-", "-",
                                 f"unavailable: {row.get('reason')}"])
                    continue
                rows.append([row["engine"], row["version"], row["batch1_ms"], row["batch32_images_per_s"],
                             f"{row['best']['images_per_s']:.0f} (b{row['best']['batch']})",
                             f"{row['max_abs_difference']:.1e}", f"{row['label_changes']}/{row['images']}", ""])
            print(format_table(["engine", "version", "ms b1", "img/s b32", "best img/s", "max |diff|",
                                "labels changed", ""], rows))

    print()
    http_info = results["http"]
    print(f"HTTP POST /file/, keep-alive, {http_info['duration_s']:.0f} s per level after "
          f"{http_info['warmup_s']:.0f} s warm-up")
    rows = []
    for level in http_info["levels"]:
        lat = level["latency_ms"]
        rows.append([level["concurrency"], level["requests_per_s"], lat["p50"], lat["p90"], lat["p99"],
                     level["errors_total"], level.get("ratio_to_raw", math.nan),
                     level.get("ratio_to_pipeline", math.nan),
                     level["machine_cpu_ms_per_request"], level["server_cpu_s"] / level["duration_s"] * 100,
                     level["client_cpu_s"] / level["duration_s"] * 100, level["machine_busy_pct"],
                     level.get("images_per_model_call", math.nan),
                     f"{level['connects']}/{level['total_requests']}"])
    print(format_table(["conc", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "/raw", "/pipeline",
                        "CPU ms/req", "srv CPU%", "cli CPU%", "busy%", "batch", "conns/reqs"], rows))
    print("(/raw, /pipeline: req/s over the raw forward limit and over the pipeline limit; CPU ms/req: "
          "whole-machine CPU time, all cores, per answered request; CPU%: of one core, server process "
          "tree / this client; busy%: whole machine; batch: mean images per model call, every "
          "worker (from /metrics); conns/reqs: TCP connections opened / requests sent)")
    if any(level["connects"] >= 0.5 * level["total_requests"] > 0 for level in http_info["levels"]):
        print("note: the server closed most connections after one request (no keep-alive); see conns/reqs")
    if http_info.get("c1_p50_over_single") is not None:
        print(f"at concurrency 1: p50 / (decode + single forward) = {http_info['c1_p50_over_single']:.2f}x")

    phone = results.get("phone")
    if phone:
        lat = phone["latency_ms"]
        in_process = (limits or {}).get("phone_in_process") or {}
        decode_note = f"; in-process decode+preprocess {in_process['decode_ms_median']:.0f} ms" if in_process else ""
        print()
        print(f"phone photo {phone['size']} ({phone['bytes'] / 1e6:.1f} MB JPEG q90, EXIF-rotated), one client: "
              f"median {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms over {lat['count']} requests, "
              f"errors {phone['errors'] + phone['warmup_errors']}{decode_note}")

    memory = results["memory"]
    print()
    print("server VmRSS (MiB, process tree): " + ", ".join(f"{k} {v:.0f}" for k, v in memory["timeline"].items()))
    soak = memory.get("soak")
    if soak:
        print(f"soak: {soak['requests']} requests at concurrency {soak['concurrency']} in {soak['seconds']:.0f} s "
              f"({soak['requests_per_s']:.1f} req/s, {soak['errors']} errors): RSS {soak['rss_before_mb']:.0f} -> "
              f"{soak['rss_after_mb']:.0f} MiB ({soak['rss_change_pct']:+.1f} %)")
    else:
        print("(no soak: --soak 10000 sends that many more requests and reports the RSS change)")

    judged = targets(results)
    if judged:
        print()
        print("speed targets (docs/performance.md)")
        print(format_table(["target", "measured", "met"],
                           [[what, measured, "yes" if met else "NO"] for what, measured, met in judged]))

    print()
    errors = results["errors_total"]
    print("result: " + ("OK, no request errors" if errors == 0 else f"{errors} request errors"))
    for sample in results["error_samples"][:5]:
        print(f"  e.g. {sample}")
    print("=" * 78)
