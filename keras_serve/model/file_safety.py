"""Inspect a model file before anything deserializes it: refuse what would run code or take memory.

A model file is hostile input. `check_model_file` reads it with h5py and zipfile only, as
metadata, and refuses (ModelFileRefused, one line naming the layer or the size) when:

- its stored config would run or need code (keras_serve/model/config_safety.py: Lambda bytecode,
  classes, modules and functions outside Keras's built-ins) - skipped for an operator's own
  models with --trust-model-code, which is never a setting, environment variable or HTTP field;
- its weights declare more than MODEL_MAX_WEIGHT_BYTES: the sum of every dataset's shape times
  its item size, read from HDF5 metadata and never from the data, so a 2 MB file declaring a
  1 GiB kernel (HDF5 fills unwritten data) is refused before a byte is allocated;
- an HDF5 object is not plain numbers in the file itself: external storage or virtual datasets
  (which read other local files), soft or external links, unknown filters, non-numeric dtypes;
- a .keras zip is a bomb: too many members, more uncompressed bytes than the budget allows, or
  a member that expands far more than Keras's own (stored, uncompressed) archives do.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from keras_serve.errors import ModelFileRefused, ModelTooLarge

log = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHT_BYTES = 768 * 1024 * 1024  # VGG16, among the largest image classifiers, declares 528 MB
MAX_HDF5_OBJECTS = 100_000      # links walked in one file (a ResNet-152 has a few thousand)
MAX_HDF5_DEPTH = 64
MAX_DATASET_DIMENSIONS = 32
MAX_ZIP_MEMBERS = 1_000         # Keras writes 3, plus a layer's assets
MAX_CONFIG_BYTES = 64 * 1024 * 1024  # config.json, metadata.json
MAX_EXPANSION = 100             # Keras stores members uncompressed; a deflated one may expand this much
EXPANSION_FLOOR_BYTES = 1024 * 1024  # small members may compress well (a config of zeros) at no risk
ARCHIVE_EXTRA_BYTES = 2 * MAX_CONFIG_BYTES  # what a .keras may unpack to beyond its weights budget
# Filters HDF5 and h5py ship: deflate, shuffle, fletcher32, szip, nbit, scaleoffset, lzf. Any other
# would load a plugin library found on the machine.
_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
_NUMERIC_KINDS = frozenset("biuf")
_MAX_OPAQUE_ITEM_BYTES = 8
_WEIGHTS_MEMBER = "model.weights.h5"
_MB = 1024 * 1024
TRUST_WARNING = ("--trust-model-code is on: model files are loaded without refusing Lambda bytecode or classes and "
                 "functions outside Keras, so any model file this process loads (--model, a published or promoted "
                 "version) can run code here. Use it only for models you wrote yourself.")


def check_model_file(path: Path, kind: str, max_weight_bytes: int = DEFAULT_MAX_WEIGHT_BYTES,
                     trust_code: bool = False) -> None:
    """Refuse `path` (already sniffed as "hdf5" or "zip") if loading it could run code or
    allocate more than `max_weight_bytes` for its weights; raises ModelFileRefused."""
    budget = int(max_weight_bytes)
    if kind == "zip":
        config, with_tf_keras = _check_zip(path, budget), False  # .keras files are loaded by Keras 3
    else:
        config, with_tf_keras = _check_hdf5_file(path, budget)
    if config is None:
        return  # weights only: the architecture comes from this project's code
    if trust_code:
        log.warning("%s: its config is not checked for code (--trust-model-code): anything it names runs",
                    path.name)
        return
    from keras_serve.model.config_safety import check_config

    check_config(config, with_tf_keras)


# --- HDF5 ---------------------------------------------------------------------------------
def _check_hdf5_file(path: Path, budget: int) -> tuple[Any, bool]:
    """Check the file's structure and declared sizes; return its parsed model_config (None for a
    weights-only file) and whether tf_keras may rebuild it."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return None, False  # no loader can open it either: keras_formats says why, in its words
    with f:
        _check_hdf5(f, budget)
        version = _attr_text(f.attrs, "keras_version") or ""
        config = _parse_config(_attr_text(f.attrs, "model_config")) if "model_config" in f.attrs else None
    major = re.match(r"\s*(\d+)", version)
    return config, not (major and int(major.group(1)) >= 3)  # Keras 2 files may be rebuilt by tf_keras


def _check_hdf5(f: Any, budget: int, what: str = "its weights") -> None:
    """Walk every link; refuse what is not plain numbers in this file, or more of them than `budget` bytes."""
    import h5py

    total, objects = 0, 0

    def visit(group: Any, prefix: str, depth: int) -> None:
        nonlocal total, objects
        if depth > MAX_HDF5_DEPTH:
            raise ModelFileRefused(f"the HDF5 file nests groups more than {MAX_HDF5_DEPTH} deep at {prefix!r}")
        for name in group:
            objects += 1
            if objects > MAX_HDF5_OBJECTS:
                raise ModelFileRefused(f"the HDF5 file has more than {MAX_HDF5_OBJECTS:,} objects")
            where = f"{prefix}/{name}"[-120:]
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise ModelFileRefused(f"the HDF5 file links {where!r} to another place or file "
                                       f"({type(link).__name__}), which Keras never writes")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                visit(obj, where, depth + 1)
            elif isinstance(obj, h5py.Dataset):
                total += _dataset_bytes(obj, where)

    visit(f, "", 0)
    if total > budget:
        raise ModelTooLarge(f"{what} declare {_size(total)}, over the budget of {_size(budget)} (MODEL_MAX_WEIGHT_BYTES)")


def _dataset_bytes(ds: Any, where: str) -> int:
    """Bytes the dataset takes once read, from its metadata; refuse storage outside the file."""
    plist = ds.id.get_create_plist()
    if ds.is_virtual:
        raise ModelFileRefused(f"the HDF5 dataset {where!r} is virtual: its data would be read from other files")
    if plist.get_external_count() > 0:
        raise ModelFileRefused(f"the HDF5 dataset {where!r} keeps its data in an external file, "
                               f"which could be any file on this machine")
    for index in range(plist.get_nfilters()):
        code = plist.get_filter(index)[0]
        if code not in _BUILTIN_FILTERS:
            raise ModelFileRefused(f"the HDF5 dataset {where!r} uses the filter {code}, which is not built into "
                                   f"HDF5 or h5py")
    dtype = ds.dtype
    # Keras 3 stores bfloat16 and float8 as opaque 1-2 byte items ("|V2"): plain bytes, no objects.
    opaque_number = dtype.kind == "V" and dtype.itemsize <= _MAX_OPAQUE_ITEM_BYTES
    if (dtype.kind not in _NUMERIC_KINDS and not opaque_number) or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise ModelFileRefused(f"the HDF5 dataset {where!r} holds {dtype}, not numbers")
    shape = ds.shape or ()  # None: an empty dataspace
    if len(shape) > MAX_DATASET_DIMENSIONS:
        raise ModelFileRefused(f"the HDF5 dataset {where!r} has {len(shape)} dimensions")
    count = 1
    for size in shape:
        count *= int(size)  # Python integers: no overflow, however absurd the shape
    return count * dtype.itemsize


def _attr_text(attrs: Any, key: str) -> str | None:
    value = attrs.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise ModelFileRefused(f"the file's {key} is not text")


def _parse_config(text: str | None) -> Any:
    if not text:
        raise ModelFileRefused("the file's model config is empty")
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelFileRefused(f"the model config is {len(text) / _MB:,.0f} MB, over {MAX_CONFIG_BYTES // _MB} MB")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelFileRefused(f"the model config is not valid JSON: {_one_line(exc)}") from None


# --- .keras zip -------------------------------------------------------------------------------
def _check_zip(path: Path, budget: int) -> Any:
    """Check the archive's members and the weights file inside it; return the parsed config."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return None  # no loader can open it either: keras_formats says why, in its words
    with zf:
        members = zf.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise ModelFileRefused(f"the zip archive has {len(members):,} members, over {MAX_ZIP_MEMBERS:,}")
        total = 0
        for member in members:
            shown = member.filename[-120:]
            if member.flag_bits & 0x1:
                raise ModelFileRefused(f"the zip member {shown!r} is encrypted")
            total += member.file_size
            if member.file_size > EXPANSION_FLOOR_BYTES and member.file_size > MAX_EXPANSION * max(1, member.compress_size):
                raise ModelFileRefused(f"the zip member {shown!r} expands {member.file_size // max(1, member.compress_size):,} "
                                       f"times ({member.compress_size:,} to {member.file_size:,} bytes): a zip bomb")
        if total > budget + ARCHIVE_EXTRA_BYTES:
            raise ModelTooLarge(f"its archive unpacks to {_size(total)}, over the weight budget of {_size(budget)} "
                                f"(MODEL_MAX_WEIGHT_BYTES) plus {_size(ARCHIVE_EXTRA_BYTES)}")
        names = {member.filename for member in members}
        if "config.json" not in names:
            return None  # not a Keras archive: the loader says so
        if _WEIGHTS_MEMBER not in names and "model.weights.npz" in names:
            raise ModelFileRefused("the archive keeps its weights as NumPy .npz, whose sizes are not checked here",
                                   "Re-save the model with model.save('model.keras') (weights as .h5, the default).")
        if _WEIGHTS_MEMBER in names:
            with _member_as_file(zf, zf.getinfo(_WEIGHTS_MEMBER)) as weights:
                _check_hdf5_member(weights, budget)
        config = zf.getinfo("config.json")
        if config.file_size > MAX_CONFIG_BYTES:
            raise ModelFileRefused(f"config.json is {config.file_size / _MB:,.0f} MB, over {MAX_CONFIG_BYTES // _MB} MB")
        with zf.open(config) as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1).decode("utf-8", "replace")
    return _parse_config(text)


def _check_hdf5_member(fileobj: IO[bytes], budget: int) -> None:
    import h5py

    try:
        f = h5py.File(fileobj, "r")
    except OSError as exc:
        raise ModelFileRefused(f"the archive's {_WEIGHTS_MEMBER} cannot be read as HDF5: {_one_line(exc)}") from None
    with f:
        _check_hdf5(f, budget)


@contextmanager
def _member_as_file(zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    """A seekable file of the member: the archive's own stream when stored (what Keras writes),
    else a temporary copy (HDF5 seeks back and forth; a deflated stream would restart each time).
    The copy is bounded: its size was checked against the budget above."""
    if member.compress_type == zipfile.ZIP_STORED:
        with zf.open(member) as fh:
            yield fh
        return
    with tempfile.TemporaryFile(prefix="keras-serve-weights-") as copy:
        with zf.open(member) as fh:
            shutil.copyfileobj(fh, copy, 1024 * 1024)
        copy.seek(0)
        yield copy


def _size(count: int) -> str:
    return f"{count / _MB:,.1f} MB" if count >= _MB // 10 else f"{count:,} bytes"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
