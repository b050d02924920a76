"""Training pairs for pretraining: matched hazy/clear folders and clear photos to synthesise from.

Two sources feed :mod:`bilalora.pretrain`:

* :class:`PairedFolder` -- ``DIR/hazy/`` and ``DIR/clear/`` matched by file stem
  (:func:`match_pairs`): the identical stem first (the shared folders repeat the
  clear image under each hazy name); as a fallback, RESIDE naming, where the
  clear stem is the hazy stem before the last underscore and then before the
  first one (``1400_1.png`` and ``1400_10_0.85.png`` -> ``1400.png``).
* :class:`ClearFolder` -- haze-free photos (``DIR/`` or ``DIR/rgb/``) with
  optional relative depth maps in ``DIR/depth/`` under the same stem; hazy
  partners are made on the fly by :mod:`bilalora.synthesis`.

Both decode once into memory as ``uint8`` ``(H, W, 3)`` RGB (a quarter of the
float size; lossless for 8-bit files) and hand out training samples as
``float32`` ``(S, S, 3)`` arrays in ``[0, 1]`` via ``sample(index, crop, rng)``,
returning ``(hazy, clear)`` with the same random crop, 90-degree rotation and
flip applied to both. A sample is a pure function of the generator, so a
resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .data import augment
from .errors import UserError
from .images import ImageDecodeError, downsize, list_images, load_image
from .synthesis import HazeRanges, depth_from_image, synthesize

__all__ = ["MATCH_RULE", "ClearFolder", "Pair", "PairedFolder", "match_pairs"]

#: One line describing how hazy and clear files are matched (used in messages and records).
MATCH_RULE = (
    "identical file stem in hazy/ and clear/; fallback (RESIDE naming): clear stem = hazy stem "
    "before the last underscore, then before the first (1400_1.png -> 1400.png)"
)


@dataclass(frozen=True)
class Pair:
    """A matched hazy file and its clear partner; ``rule`` is ``"same-stem"``, ``"reside-last"`` or ``"reside-first"``."""

    hazy: Path
    clear: Path
    rule: str


def _subfolder(root: Path, name: str, flag: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise UserError(
            f"{flag} {root}: missing subfolder {name}/ (expected {root}/hazy/ and {root}/clear/ "
            "with matching file names)"
        )
    return folder


def match_pairs(root: str | os.PathLike, flag: str = "--pairs") -> tuple[list[Pair], list[Path]]:
    """Match ``root/hazy/*`` with ``root/clear/*`` by stem (see :data:`MATCH_RULE`).

    Args:
        root: the folder holding ``hazy/`` and ``clear/``.
        flag: the CLI flag named in error messages.

    Returns:
        (pairs sorted by hazy path, hazy files without a clear partner).

    Raises:
        UserError: ``root``, ``hazy/`` or ``clear/`` is missing or empty, or no file matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: folder does not exist")
    hazy_dir = _subfolder(root, "hazy", flag)
    clear_dir = _subfolder(root, "clear", flag)
    try:
        hazy_files = list_images(hazy_dir)
        clear_files = list_images(clear_dir)
    except UserError as err:
        raise UserError(f"{flag} {root}: {err.message.split(';')[0]}") from None
    clear_by_stem: dict[str, Path] = {}
    for path in clear_files:
        clear_by_stem.setdefault(path.stem, path)
    pairs, unmatched = [], []
    for hazy in hazy_files:
        stem = hazy.stem
        candidates = [(stem, "same-stem")]
        if "_" in stem:
            candidates += [(stem.rsplit("_", 1)[0], "reside-last"), (stem.split("_", 1)[0], "reside-first")]
        for key, rule in candidates:
            if key in clear_by_stem:
                pairs.append(Pair(hazy, clear_by_stem[key], rule))
                break
        else:
            unmatched.append(hazy)
    if not pairs:
        example = hazy_files[0].name
        raise UserError(
            f"{flag} {root}: no hazy image in {hazy_dir} has a clear partner in {clear_dir} "
            f"(e.g. {example}); matching rule: {MATCH_RULE}"
        )
    return pairs, unmatched


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))


def _fit_clear(clear: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Bring a clear image to the hazy image's (H, W).

    A clear image a little larger in both sides (up to 10 %, as SOTS ships GT with
    a border the hazy crop lacks) is centre-cropped; any other mismatch is resized.
    """
    height, width = shape
    ch, cw = clear.shape[:2]
    if (ch, cw) == (height, width):
        return clear, "same"
    if ch >= height and cw >= width and ch - height <= 0.1 * height and cw - width <= 0.1 * width:
        top, left = (ch - height) // 2, (cw - width) // 2
        return np.ascontiguousarray(clear[top : top + height, left : left + width]), "cropped"
    return cv2.resize(clear, (width, height), interpolation=cv2.INTER_AREA), "resized"


def _crop_box(height: int, width: int, side: int, rng: np.random.Generator) -> tuple[int, int]:
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left


def _to_float_square(patch: np.ndarray, crop: int) -> np.ndarray:
    """uint8 or float (s, s, C) -> float32 (crop, crop, C) in [0, 1] (INTER_AREA down, INTER_CUBIC up)."""
    out = patch.astype(np.float32)
    if patch.dtype == np.uint8:
        out /= np.float32(255.0)
    if out.shape[0] != crop:
        interp = cv2.INTER_AREA if out.shape[0] > crop else cv2.INTER_CUBIC
        resized = cv2.resize(out, (crop, crop), interpolation=interp)
        out = np.clip(resized.reshape(crop, crop, -1), 0.0, 1.0).astype(np.float32)
    return out


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / np.float32(255.0)


def _split(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(stack[..., :3]), np.ascontiguousarray(stack[..., 3:6])


class PairedFolder:
    """Matched hazy/clear pairs decoded into memory.

    Clear files with identical bytes are decoded once (the shared folders
    repeat each clear image under every hazy name).

    Args:
        root: folder with ``hazy/`` and ``clear/``.
        max_side: downsize images whose longer side exceeds it (None: keep).
        flag: CLI flag for messages.

    Attributes:
        pairs: the matched :class:`Pair` list (only those that decoded).
        unmatched: hazy files without a partner.
        skipped: ``(path, reason)`` of files that did not decode.
        fitted: how many clear images were cropped or resized to their hazy image.
    """

    def __init__(self, root: str | os.PathLike, max_side: int | None = None, flag: str = "--pairs"):
        self.root = Path(root)
        self.flag = flag
        self.max_side = max_side
        matched, self.unmatched = match_pairs(self.root, flag)
        self.pairs: list[Pair] = []
        self.skipped: list[tuple[Path, str]] = []
        self.fitted = {"same": 0, "cropped": 0, "resized": 0}
        self._hazy: list[np.ndarray] = []
        self._clear_index: list[int] = []
        self._clear: list[np.ndarray] = []
        by_digest: dict[tuple[str, tuple[int, int]], int] = {}
        for pair in matched:
            try:
                hazy = downsize(_to_uint8(load_image(pair.hazy)), max_side)
                digest = hashlib.sha1(pair.clear.read_bytes()).hexdigest()
                key = (digest, hazy.shape[:2])
                if key not in by_digest:
                    clear, how = _fit_clear(_to_uint8(load_image(pair.clear)), hazy.shape[:2])
                    self.fitted[how] += 1
                    by_digest[key] = len(self._clear)
                    self._clear.append(clear)
            except ImageDecodeError as err:
                self.skipped.append((err.path, err.reason))
                continue
            self.pairs.append(pair)
            self._hazy.append(hazy)
            self._clear_index.append(by_digest[key])
        if not self.pairs:
            raise UserError(f"{flag} {self.root}: none of the {len(matched)} matched pairs could be decoded")

    def __len__(self) -> int:
        return len(self.pairs)

    def hazy(self, index: int) -> np.ndarray:
        """Hazy image ``index``: uint8 (H, W, 3) RGB."""
        return self._hazy[index]

    def clear(self, index: int) -> np.ndarray:
        """Clear image of pair ``index``: uint8 (H, W, 3) RGB, same (H, W) as its hazy image."""
        return self._clear[self._clear_index[index]]

    def full(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``index`` as float32 (H, W, 3) arrays in [0, 1]: (hazy, clear)."""
        return _as_float(self.hazy(index)), _as_float(self.clear(index))

    def sample(self, index: int, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random aligned crop of pair ``index``, rotated/flipped alike.

        A square of side ``min(H, W, crop)`` (resized up to ``crop`` when smaller).

        Returns:
            (hazy, clear), float32 (crop, crop, 3) in [0, 1].
        """
        hazy, clear = self.hazy(index), self.clear(index)
        height, width = hazy.shape[:2]
        side = min(height, width, crop)
        top, left = _crop_box(height, width, side, rng)
        stack = np.concatenate(
            [hazy[top : top + side, left : left + side], clear[top : top + side, left : left + side]], axis=2
        )
        return _split(augment(_to_float_square(stack, crop), rng))

    def summary(self) -> dict:
        """JSON-ready description (folder, counts, matching rules used, skipped files)."""
        rules: dict[str, int] = {}
        for pair in self.pairs:
            rules[pair.rule] = rules.get(pair.rule, 0) + 1
        return {
            "folder": str(self.root),
            "n_pairs": len(self.pairs),
            "n_clear_images": len(self._clear),
            "n_unmatched_hazy": len(self.unmatched),
            "unmatched_examples": [p.name for p in self.unmatched[:5]],
            "n_skipped": len(self.skipped),
            "skipped": [f"{p.name} ({reason})" for p, reason in self.skipped[:10]],
            "matched_by": rules,
            "clear_fitted": dict(self.fitted),
            "max_side": self.max_side,
            "matching_rule": MATCH_RULE,
        }


class ClearFolder:
    """Haze-free photos (and optional depth maps) to synthesise hazy partners from.

    Layout: images in ``DIR/rgb/`` when that folder exists, else in ``DIR/``;
    depth maps (any image format, brighter = farther) in ``DIR/depth/`` under
    the image's stem. Images without depth get :func:`bilalora.synthesis.synthetic_depth`.

    Args:
        root: the folder.
        max_side: downsize images (and depth) whose longer side exceeds it.
        ranges: haze parameter distribution for :func:`bilalora.synthesis.synthesize` (default :class:`HazeRanges`).
        scale: (low, high) of the crop-side multiplier: a square of side
            ``crop * U(low, high)`` (at most the short side) is cut and resized to
            ``crop``, so that crops of large photos show whole scenes.
        flag: CLI flag for messages.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        max_side: int | None = None,
        ranges: HazeRanges | None = None,
        scale: tuple[float, float] = (1.0, 3.0),
        flag: str = "--clear",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{flag} {self.root}: folder does not exist")
        rgb = self.root / "rgb"
        self.image_dir = rgb if rgb.is_dir() else self.root
        depth_dir = self.root / "depth"
        self.ranges = ranges if ranges is not None else HazeRanges()
        self.scale = scale
        self.max_side = max_side
        try:
            files = list_images(self.image_dir)
        except UserError as err:
            raise UserError(f"{flag} {self.root}: {err.message.split(';')[0]}") from None
        depth_files: dict[str, Path] = {}
        if depth_dir.is_dir():
            try:
                depth_files = {p.stem: p for p in list_images(depth_dir)}
            except UserError:
                depth_files = {}
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        self._images: list[np.ndarray] = []
        self._depth: list[np.ndarray | None] = []
        for path in files:
            try:
                image = downsize(_to_uint8(load_image(path)), max_side)
                depth = None
                if path.stem in depth_files:
                    raw = depth_from_image(load_image(depth_files[path.stem]))
                    depth = cv2.resize(raw, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
                    depth = _to_uint8(depth[..., None])[..., 0]
            except ImageDecodeError as err:
                self.skipped.append((err.path, err.reason))
                continue
            self.paths.append(path)
            self._images.append(image)
            self._depth.append(depth)
        if not self._images:
            raise UserError(f"{flag} {self.root}: no clear image could be decoded")

    def __len__(self) -> int:
        return len(self._images)

    @property
    def n_with_depth(self) -> int:
        """How many images have a depth map."""
        return sum(d is not None for d in self._depth)

    def sample(
        self, index: int, crop: int, rng: np.random.Generator, ranges: HazeRanges | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A random crop of image ``index`` with synthesised haze, rotated/flipped with its clear crop.

        Args:
            index, crop, rng: which image, the crop side, the generator.
            ranges: haze distribution for this sample (None: the folder's ``ranges``).

        Returns:
            (hazy, clear), float32 (crop, crop, 3) in [0, 1].
        """
        image, depth = self._images[index], self._depth[index]
        height, width = image.shape[:2]
        side = int(min(height, width, round(crop * rng.uniform(*self.scale))))
        top, left = _crop_box(height, width, side, rng)
        clear = _to_float_square(image[top : top + side, left : left + side], crop)
        if depth is not None:
            patch_depth = _to_float_square(depth[top : top + side, left : left + side, None], crop)[..., 0]
        else:
            patch_depth = None
        window = (top / height, left / width, side / height, side / width)
        hazy, _ = synthesize(clear, rng, patch_depth, ranges if ranges is not None else self.ranges, window)
        return _split(augment(np.concatenate([hazy, clear], axis=2), rng))

    def summary(self) -> dict:
        """JSON-ready description (folder, counts, depth maps, haze ranges)."""
        from dataclasses import asdict

        return {
            "folder": str(self.root),
            "n_images": len(self._images),
            "n_with_depth": self.n_with_depth,
            "n_skipped": len(self.skipped),
            "skipped": [f"{p.name} ({reason})" for p, reason in self.skipped[:10]],
            "max_side": self.max_side,
            "crop_scale": list(self.scale),
            "haze": asdict(self.ranges),
        }
