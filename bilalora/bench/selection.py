"""Which images a benchmark scores, and whether the adapt run saw them.

By default a benchmark scores the run's held-out ``test`` split: images that
neither level of the adaptation saw. ``split.json`` (written by ``bilalora
adapt``) holds::

    {"seed": 0, "images_root": "/data/real_day",             # absolute
     "train": ["a.jpg", ...], "val": [...], "test": [...]}   # relative to images_root

(read by :func:`bilalora.runs.read_split`, the one reader of the run-folder layout).
Older runs stored ``train``/``val`` only, with paths as typed when the run
started: they fall back to the validation half, with a note saying that the
gates were trained on those images (not held out).

``--images DIR`` scores any folder; each image is then looked up in the run's
split so that the record says whether the run saw it (``train``, ``val``,
``test`` or ``unseen``). Folder entries that look like images but are not
readable files (a directory named ``x.png``, a symlink loop, a dangling link)
are named as skipped, never dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

__all__ = ["ImageSelection", "select_images", "SPLITS"]

#: The parts of split.json, in the order a path is looked up.
SPLITS = ("train", "val", "test")


@dataclass
class ImageSelection:
    """The images to score.

    Attributes:
        paths: image files to decode, sorted as listed.
        origin: a one-line description ("runs/adapt/exp/split.json: test split (14 images)").
        split: "test", "val" (an old run without a test split) or "folder" (``--images``).
        seen: {path string: "train" | "val" | "test" | "unseen"} for every path.
        skipped: (name, reason) of folder entries that are not readable files.
        notes: lines the CLI prints (fallbacks, images that are gone).
    """

    paths: list[Path]
    origin: str
    split: str
    seen: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: origin, split and how many images per seen-status."""
        return {"origin": self.origin, "split": self.split, "seen_by_run": dict(Counter(self.seen.values()))}


def _key(path: Path) -> str:
    """A comparable identity of a file (resolved path; the path as given where that fails)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(path)


def _folder_entries(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files of ``folder`` and the image-named entries that are not readable files (with why)."""
    from bilalora.data import IMAGE_SUFFIXES

    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_symlink() and not path.exists():
            try:
                os.stat(path)
                reason = "unreadable link"
            except OSError as exc:
                reason = f"broken symlink ({exc.strerror or exc})"
            skipped.append((path.name, reason))
        elif path.is_dir():
            skipped.append((path.name, "a directory, not an image file"))
        elif not path.is_file():
            skipped.append((path.name, "not a regular file"))
        else:
            files.append(path)
    return files, skipped


def select_images(images: Optional[Path], run: Optional[Path]) -> ImageSelection:
    """The images to score (see the module docstring). Checked before anything slow runs.

    Args:
        images: ``--images`` folder, or None for the run's held-out split.
        run: the adapt run the subjects came from (None: ``--images`` is required).

    Raises:
        UserError: a missing or empty folder, no run to take a split from, or a split whose
            images are all gone (one line saying to pass ``--images``).
    """
    from bilalora.runs import read_split

    split = read_split(run) if run is not None and (Path(run) / "split.json").is_file() else None
    lookup: dict[str, str] = {}
    for name in SPLITS:
        for path in (split or {}).get(name, []):
            lookup.setdefault(_key(path), name)

    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise UserError(f"--images {folder}: not a folder")
        files, skipped = _folder_entries(folder)
        if not files:
            detail = f" ({len(skipped)} unreadable entries)" if skipped else ""
            raise UserError(f"--images {folder}: no images in this folder{detail}")
        seen = {str(p): lookup.get(_key(p), "unseen") for p in files}
        selection = ImageSelection(files, str(folder), "folder", seen, skipped)
        counts = Counter(seen.values())
        if run is not None and split is not None and counts.get("train", 0) + counts.get("val", 0):
            selection.notes.append(
                f"{counts.get('train', 0) + counts.get('val', 0)} of {len(files)} images were used by {run} "
                "to adapt (train/val): those scores are not held out"
            )
        return selection

    if run is None:
        raise UserError("no --images given and no adapt run to take the held-out test split from; "
                        "pass --images DIR or run `bilalora adapt --images DIR` first")  # fmt: skip
    if split is None:
        raise UserError(f"{run} has no split.json to take the held-out images from; pass --images DIR")
    notes: list[str] = []
    if split["test"]:
        which, wanted = "test", split["test"]
        label = "held-out test split"
    else:
        which, wanted = "val", split["val"]
        label = "validation half (old run without a test split: the gates were trained on these, not held out)"
        notes.append(f"{run}/split.json has no test split (run made before held-out splits); scoring the "
                     "validation half, which the run saw; pass --images DIR for unseen photos")  # fmt: skip
    present = [p for p in wanted if p.is_file()]
    if len(present) < len(wanted):
        notes.append(f"{len(wanted) - len(present)} of {len(wanted)} {which} images are gone; scoring the rest")
    if not present:
        raise UserError(f"{run}/split.json: none of its {which} images exist any more; pass --images DIR")
    origin = f"{run}/split.json: {label}, {len(present)} of {len(wanted)} images present"
    return ImageSelection(present, origin, which, {str(p): which for p in present}, [], notes)
