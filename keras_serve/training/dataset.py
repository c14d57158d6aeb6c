"""Labelled image folders (`<split>/<class>/<file>`) decoded through the shared preprocessing.

Used by training and evaluation. Decoding is the slow part, so decoded uint8 arrays are
cached on disk keyed by the file list and the preprocessing spec; the cache is an
accelerator only and is rebuilt whenever either changes.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from keras_serve.settings import PROJECT_ROOT

import numpy as np

from keras_serve.errors import ImageError
from keras_serve.pipeline.preprocessing import DECODER_VERSION, PreprocessSpec, decode_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache"


def list_labelled_images(root: Path, splits: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and integer labels under root/<split>/<class>/; classes sorted by name (cats=0, dogs=1)."""
    root = Path(root)
    split_dirs = [root / s for s in splits] if splits else [root]
    for d in split_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"no such folder: {d}")
    class_names = sorted({c.name for d in split_dirs for c in d.iterdir() if c.is_dir()})
    if not class_names:
        raise FileNotFoundError(f"no class folders under {', '.join(map(str, split_dirs))}")
    paths: list[Path] = []
    labels: list[int] = []
    for d in split_dirs:
        for index, name in enumerate(class_names):
            folder = d / name
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(f)
                    labels.append(index)
    return paths, np.asarray(labels, dtype=np.int32), class_names


def _decode_file(args: tuple[str, PreprocessSpec]) -> np.ndarray | None:
    path, spec = args
    try:
        return decode_image(Path(path).read_bytes(), spec)
    except ImageError:
        return None


def decode_files(paths: list[Path], spec: PreprocessSpec, cache_dir: Path | None = DEFAULT_CACHE_DIR,
                 workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode every file to uint8 (N, H, W, C); returns (pixels, mask of files that decoded)."""
    key = hashlib.sha256(
        repr((DECODER_VERSION, sorted(asdict(spec).items()), [str(p) for p in paths])).encode()
    ).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"decoded-{key}.npz" if cache_dir else None
    if cache_file and cache_file.exists():
        with np.load(cache_file) as cached:
            return cached["pixels"], cached["ok"]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(_decode_file, [(str(p), spec) for p in paths], chunksize=64))
    ok = np.array([d is not None for d in decoded])
    blank = np.zeros((spec.height, spec.width, spec.channels), np.uint8)
    pixels = np.stack([d if d is not None else blank for d in decoded]) if decoded else \
        np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=pixels, ok=ok)
        os.replace(tmp, cache_file)
    return pixels, ok
