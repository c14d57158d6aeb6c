"""Sets written by `python -m keras_serve.storage export-dataset OUT`, as training and evaluation data.

An exported set is OUT/<label>/<sha256>.<ext> plus OUT/manifest.csv (id, sha256, label, source).
Its label folders are matched to the run's classes BY NAME, case-insensitively (`dog/` is DOG
wherever it sorts), never by position: a review set has only the labels people chose, so its
folders need not be all the classes, nor sort like the base data's. A folder that names no
class (`neither/`, out of scope) is refused unless the caller skips it by name.

The held-out part: `is_held_out(sha256)`, a rule on the image's content. Training never uses
those images, evaluation scores only them, and neither needs to remember anything: the same
photo is held out in every export, every run and every machine.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from keras_serve.errors import DatasetError
from keras_serve.training.dataset import IMAGE_SUFFIXES

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("id", "sha256", "label", "source")
SHA256 = re.compile(r"[0-9a-f]{64}")

HELD_OUT_RULE = "int(sha256, 16) % 5 == 0"
HELD_OUT_FRACTION = 0.2


def is_held_out(sha256: str) -> bool:
    """Whether an exported image is kept out of training, for evaluation (about 1 in 5).

    The one place the rule lives: train.py and evaluate.py both ask here. sha256 digests are
    uniform, so the part is a fair 20% sample of every set, whatever it holds.
    """
    return int(sha256, 16) % 5 == 0


def held_out_description() -> dict:
    """The rule as the model card and the comparison report record it."""
    return {"rule": HELD_OUT_RULE, "fraction": HELD_OUT_FRACTION,
            "function": f"{__name__}.is_held_out", "of": "the image file's sha256 (hex)"}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    sha256: str
    label: int          # index into the run's labels
    source: str         # "review" or "feedback" (from the manifest); "base" for the base data


@dataclass
class ExportedSet:
    root: Path
    manifest_sha256: str
    labels: list[str]
    images: list[LabelledImage]
    folders: dict[str, str]                              # label folder -> the run label it matched
    skipped: dict[str, int] = field(default_factory=dict)  # skipped label folder -> files in it

    def held_out(self) -> list[LabelledImage]:
        return [image for image in self.images if is_held_out(image.sha256)]

    def trainable(self) -> list[LabelledImage]:
        return [image for image in self.images if not is_held_out(image.sha256)]

    def describe(self) -> dict:
        """What the model card records about this set."""
        def per_label(images: list[LabelledImage]) -> dict[str, int]:
            return {label: sum(1 for i in images if i.label == index) for index, label in enumerate(self.labels)}

        sources: dict[str, int] = {}
        for image in self.images:
            sources[image.source] = sources.get(image.source, 0) + 1
        return {"path": str(self.root), "manifest_sha256": self.manifest_sha256, "images": len(self.images),
                "per_label": per_label(self.images), "held_out": len(self.held_out()),
                "held_out_per_label": per_label(self.held_out()), "sources": dict(sorted(sources.items())),
                "label_folders": self.folders, "skipped_folders": self.skipped}


def match_label_folders(folders: Iterable[str], labels: list[str], aliases: list[str] | None = None,
                        skip: Iterable[str] = ()) -> dict[str, int | None]:
    """Label folder name -> index of the class it names (None: skipped), matched by name.

    A folder matches a class when it equals, ignoring case, the class's label or its alias
    (the base data's class folder at the same index, e.g. `cats` for CAT). Raises DatasetError
    for a folder that matches no class and is not skipped, or matches two.
    """
    skip_names = {s.casefold() for s in skip}
    names = [{labels[i].casefold()} | ({aliases[i].casefold()} if aliases else set()) for i in range(len(labels))]
    mapping: dict[str, int | None] = {}
    unknown = []
    for folder in sorted(folders):
        if folder.casefold() in skip_names:
            mapping[folder] = None
            continue
        matches = [i for i, n in enumerate(names) if folder.casefold() in n]
        if len(matches) > 1:
            raise DatasetError(f"label folder {folder!r} matches more than one class of {labels}",
                               "Give --labels that differ from each other ignoring case.")
        if not matches:
            unknown.append(folder)
            continue
        mapping[folder] = matches[0]
    if unknown:
        known = ", ".join(labels + [a for a in (aliases or []) if a not in labels])
        raise DatasetError(
            f"label folder(s) {', '.join(repr(u) for u in unknown)} name no class of this model "
            f"(classes: {known}; matched by name, ignoring case)",
            f"Leave them out with --skip-label {' --skip-label '.join(unknown)}, or export without them.")
    return mapping


def read_exported_set(root: Path, labels: list[str], aliases: list[str] | None = None,
                      skip: Iterable[str] = ()) -> ExportedSet:
    """Read and check one export: every image file is in the manifest under its folder and
    vice versa (files hashed, not trusted by name); folders mapped by `match_label_folders`."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(f"{root} has no {MANIFEST}: not a folder written by export-dataset",
                           "Write it with: python -m keras_serve.storage export-dataset " + str(root))
    manifest_bytes = manifest_path.read_bytes()
    reader = csv.DictReader(manifest_bytes.decode("utf-8", errors="replace").splitlines())
    rows = list(reader)
    if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS or any(not SHA256.fullmatch(r["sha256"] or "") for r in rows):
        raise DatasetError(f"{manifest_path} is not an export-dataset manifest ({', '.join(MANIFEST_FIELDS)})")
    listed = {(r["label"], r["sha256"]): r for r in rows}

    folders = [d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")]
    mapping = match_label_folders(folders, labels, aliases, skip)
    images: list[LabelledImage] = []
    skipped: dict[str, int] = {}
    found: set[tuple[str, str]] = set()
    for folder, index in sorted(mapping.items()):
        files = sorted(f for f in (root / folder).iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
        if index is None:
            skipped[folder] = len(files)
            continue
        for f in files:
            sha = file_sha256(f)
            row = listed.get((folder, sha))
            if row is None:
                raise DatasetError(f"{f} is not in {manifest_path} under {folder!r}: the folder and its manifest "
                                   f"disagree", "Run export-dataset again into that folder; it brings both in step.")
            found.add((folder, sha))
            images.append(LabelledImage(f, sha, index, row["source"] or "review"))
    missing = [key for key in listed if key[0] in mapping and mapping[key[0]] is not None and key not in found]
    missing += [key for key in listed if key[0] not in mapping]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {manifest_path} are missing "
                           f"(e.g. {missing[0][0]}/{missing[0][1][:12]}...)",
                           "Run export-dataset again into that folder; it brings both in step.")
    return ExportedSet(root, hashlib.sha256(manifest_bytes).hexdigest(), list(labels), images,
                       {f: labels[i] for f, i in mapping.items() if i is not None}, skipped)


@dataclass
class Combined:
    """Base images plus exported sets, one example per distinct image (sha256)."""
    train: list[LabelledImage]
    duplicates: int = 0         # images seen more than once (base and/or sets): counted once
    label_conflicts: int = 0    # of those, seen with different labels: the later source's label counts
    excluded: int = 0           # images left out of training: held out, or in the validation split

    def describe(self) -> dict:
        return {"duplicates_merged": self.duplicates, "label_conflicts_later_source_wins": self.label_conflicts,
                "left_out_held_out_or_validation": self.excluded}


def combine_for_training(base: list[LabelledImage], sets: list[ExportedSet],
                         never_train: set[str] = frozenset()) -> Combined:
    """The training examples: base first, then each set in order, deduplicated by sha256.

    Left out: every set's held-out part (also where the same photo is in the base data, or it
    would be trained on after all) and every sha256 in `never_train` (the validation split's).
    Where the same image has two labels, the later source's wins: a review is a correction.
    """
    held_out = {image.sha256 for s in sets for image in s.held_out()}
    chosen: dict[str, LabelledImage] = {}
    result = Combined([])
    for image in [*base, *(image for s in sets for image in s.images)]:
        previous = chosen.get(image.sha256)
        if previous is not None:
            result.duplicates += 1
            result.label_conflicts += previous.label != image.label
        chosen[image.sha256] = image
    for sha, image in chosen.items():
        if sha in held_out or sha in never_train:
            result.excluded += 1
        else:
            result.train.append(image)
    return result


def held_out_images(sets: list[ExportedSet]) -> list[LabelledImage]:
    """Every set's held-out part, one per distinct image (the later set's label wins)."""
    chosen: dict[str, LabelledImage] = {}
    for s in sets:
        for image in s.held_out():
            chosen[image.sha256] = image
    return list(chosen.values())
