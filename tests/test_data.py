"""Tests for bilalora.images (listing, decoding, folders) and bilalora.data (splits, crops, batches)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_without_torch  # tests/ is on sys.path under pytest
from PIL import Image

from bilalora.data import (
    CropBatches,
    augment,
    center_square_crop,
    random_square_crop,
    split_half,
    val_batches,
)
from bilalora.errors import UserError
from bilalora.images import IMAGE_SUFFIXES, ImageDecodeError, ImageFolder, is_image_path, list_images, load_image

REPO = Path(__file__).resolve().parents[1]
CROP = 224


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 RGB test image (H, W, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)


def _jpeg_bytes(height: int = 240, width: int = 320) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(height, width, seed=7)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


GOOD = {
    "a_rgb.jpg",
    "b_rgb.png",
    "c_upper.JPG",
    "d_gray.png",
    "e_rgba.png",
    "f_palette.png",
    "g_cmyk.jpg",
    "h_gray16.png",
    "i_rgb16.png",
    "j_exif6.jpg",
    "k_tiny.png",
}
BAD = {"x_empty.png", "y_truncated.jpg", "z_text.jpg"}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """A folder with every supported kind of image, three bad files, a .txt and a subfolder."""
    root = tmp_path / "hazy"
    root.mkdir()
    Image.fromarray(_rgb(300, 400, 1)).save(root / "a_rgb.jpg", quality=95)
    Image.fromarray(_rgb(260, 280, 2)).save(root / "b_rgb.png")
    Image.fromarray(_rgb(250, 330, 3)).save(root / "c_upper.JPG", format="JPEG")
    gray = np.full((240, 256), 128, np.uint8)
    Image.fromarray(gray, mode="L").save(root / "d_gray.png")
    rgba = np.zeros((230, 240, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, colour kept
    Image.fromarray(rgba, mode="RGBA").save(root / "e_rgba.png")
    Image.fromarray(_rgb(228, 250, 4)).convert("P").save(root / "f_palette.png")
    Image.new("CMYK", (260, 240), (0, 0, 0, 0)).save(root / "g_cmyk.jpg", quality=95)
    gray16 = np.full((236, 250), 40000, np.uint16)
    assert cv2.imwrite(str(root / "h_gray16.png"), gray16)
    rgb16 = np.zeros((240, 232, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 1000, 40000, 65535  # B, G, R in OpenCV order
    assert cv2.imwrite(str(root / "i_rgb16.png"), rgb16)
    exif_img = np.zeros((240, 320, 3), np.uint8)
    exif_img[:40, :40] = 255  # white block top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(exif_img).save(root / "j_exif6.jpg", exif=exif, quality=95)
    Image.fromarray(_rgb(60, 100, 5)).save(root / "k_tiny.png")
    (root / "x_empty.png").write_bytes(b"")
    jpeg = _jpeg_bytes()
    (root / "y_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "z_text.jpg").write_text("this is not a jpeg\n")
    (root / "notes.txt").write_text("camera notes\n")
    sub = root / "sub"
    sub.mkdir()
    Image.fromarray(_rgb(256, 256, 6)).save(sub / "nested.png")
    return root


# ----------------------------------------------------------------------------- listing


def test_suffixes():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} <= set(IMAGE_SUFFIXES)


def test_list_images(folder: Path):
    names = [p.name for p in list_images(folder)]
    assert names == sorted(names)
    assert set(names) == GOOD | BAD  # .txt ignored, .JPG matched, sub/ not searched
    deep = list_images(folder, recursive=True)
    assert folder / "sub" / "nested.png" in deep
    assert len(deep) == len(names) + 1


def test_list_images_errors(tmp_path: Path):
    missing = tmp_path / "missing_folder"
    with pytest.raises(UserError, match="missing_folder"):
        list_images(missing)
    only_txt = tmp_path / "only_txt"
    only_txt.mkdir()
    (only_txt / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="only_txt") as info:
        list_images(only_txt)
    assert "\n" not in str(info.value) and "--images" in str(info.value)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(UserError, match="empty_folder"):
        list_images(empty)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(UserError, match="file.png"):
        list_images(a_file)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(GOOD))
def test_load_image_shapes(folder: Path, name: str):
    image = load_image(folder / name)
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert image.flags.c_contiguous
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_load_image_values(folder: Path):
    gray = load_image(folder / "d_gray.png")
    np.testing.assert_allclose(gray, 128 / 255, atol=1e-6)
    rgba = load_image(folder / "e_rgba.png")
    np.testing.assert_allclose(rgba[0, 0], [200 / 255, 0, 0], atol=1e-6)
    cmyk = load_image(folder / "g_cmyk.jpg")
    assert cmyk.mean() > 0.95  # CMYK (0, 0, 0, 0) is white
    gray16 = load_image(folder / "h_gray16.png")
    assert gray16.shape == (236, 250, 3)
    np.testing.assert_allclose(gray16, 40000 / 65535, atol=1e-6)
    assert abs(float(gray16[0, 0, 0]) - 0.6104) < 1e-4
    rgb16 = load_image(folder / "i_rgb16.png")
    assert rgb16.shape == (240, 232, 3)
    np.testing.assert_allclose(rgb16[5, 5], [1.0, 40000 / 65535, 1000 / 65535], atol=1e-6)
    palette = load_image(folder / "f_palette.png")
    assert palette.shape == (228, 250, 3)


def test_load_image_16bit_gray_pil(tmp_path: Path):
    path = tmp_path / "g16_pil.png"
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(path)
    np.testing.assert_allclose(load_image(path), 40000 / 65535, atol=1e-6)


def test_load_image_16bit_rgb_tiff(tmp_path: Path):
    path = tmp_path / "rgb16.tif"
    data = np.zeros((20, 30, 3), np.uint16)
    data[..., 2] = 40000  # red in BGR order
    assert cv2.imwrite(str(path), data)
    image = load_image(path)
    np.testing.assert_allclose(image[0, 0], [40000 / 65535, 0, 0], atol=1e-6)


def test_load_image_exif_orientation(folder: Path):
    image = load_image(folder / "j_exif6.jpg")
    assert image.shape == (320, 240, 3)  # stored 240x320 (H x W), shown rotated 90 degrees
    # Orientation 6 means "rotate 90 clockwise to display": the stored top-left goes top-right.
    assert image[:30, -30:].mean() > 0.9
    assert image[:30, :30].mean() < 0.1


def test_load_image_exif_orientation_16bit(tmp_path: Path):
    """16-bit colour files read through OpenCV still get their EXIF orientation."""
    path = tmp_path / "rot16.png"
    data = np.zeros((20, 30, 3), np.uint16)
    assert cv2.imwrite(str(path), data)
    exif = Image.Exif()
    exif[0x0112] = 6
    # Pillow cannot write 16-bit colour PNG; insert an eXIf chunk after IHDR by hand.
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    raw = path.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    path.write_bytes(raw[:ihdr_end] + chunk + raw[ihdr_end:])
    with Image.open(path) as img:
        assert img.getexif().get(0x0112) == 6
    assert load_image(path).shape == (30, 20, 3)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("x_empty.png", "empty"), ("y_truncated.jpg", "truncated"), ("z_text.jpg", "not an image")],
)
def test_load_image_bad(folder: Path, name: str, reason: str):
    with pytest.raises(ImageDecodeError, match=reason) as info:
        load_image(folder / name)
    assert isinstance(info.value, UserError)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert info.value.path == folder / name


def test_load_image_missing(tmp_path: Path):
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- folder


def test_image_folder(folder: Path):
    data = ImageFolder(folder)
    assert len(data) == len(GOOD)
    assert {p.name for p in data.paths} == GOOD
    assert {p.name for p, _ in data.skipped} == BAD
    for i in range(len(data)):
        assert data[i].dtype == np.float32 and data[i].shape[2] == 3
        assert not data[i].flags.writeable
    line = data.report_skipped()
    assert line is not None and "\n" not in line
    assert "skipped 3" in line
    for name in BAD:
        assert name in line
    summary = data.summary()
    assert summary["n_images"] == len(GOOD) and summary["n_skipped"] == 3
    assert set(summary["skipped"]) == BAD
    assert summary["min_hw"] == [60, 100]
    assert summary["max_hw"] == [320, 400]
    json.dumps(summary)


def test_image_folder_recursive_and_max_side(folder: Path):
    data = ImageFolder(folder, recursive=True, max_side=128)
    assert folder / "sub" / "nested.png" in data.paths
    assert "sub/nested.png" not in data.summary()["skipped"]
    assert all(max(image.shape[:2]) <= 128 for image in data.images)
    a = data[data.paths.index(folder / "a_rgb.jpg")]
    assert a.shape == (96, 128, 3)
    tiny = data[data.paths.index(folder / "k_tiny.png")]
    assert tiny.shape == (60, 100, 3)  # never upsized


def test_image_folder_clean_report(tmp_path: Path):
    Image.fromarray(_rgb(50, 50)).save(tmp_path / "one.png")
    data = ImageFolder(tmp_path)
    assert data.report_skipped() is None
    assert data.summary()["n_skipped"] == 0


def test_image_folder_all_bad(tmp_path: Path):
    bad = tmp_path / "all_bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("nope")
    with pytest.raises(UserError, match="all_bad") as info:
        ImageFolder(bad)
    assert "2" in str(info.value) and "\n" not in str(info.value)


def test_image_folder_missing(tmp_path: Path):
    with pytest.raises(UserError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- split


def test_split_half():
    paths = [Path(f"img_{i:02d}.jpg") for i in range(11)]
    train, val = split_half(paths, seed=3)
    assert len(train) == 6 and len(val) == 5
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(paths)
    assert all(isinstance(p, Path) for p in train + val)
    assert isinstance(train, list) and isinstance(val, list)
    # Deterministic, independent of input order, and seed-dependent.
    assert split_half(list(reversed(paths)), seed=3) == (train, val)
    assert any(split_half(paths, seed=s)[0] != train for s in range(4, 10))
    assert split_half(paths, seed=3).warning is None


def test_split_half_one_and_two():
    one = split_half([Path("only.jpg")])
    train, val = one
    assert train == val == [Path("only.jpg")]
    assert one.warning and one.shared
    train, val = split_half(["a.jpg", "b.jpg"], seed=0)
    assert len(train) == len(val) == 1 and train != val
    with pytest.raises(UserError):
        split_half([])


# ----------------------------------------------------------------------------- crops


def test_random_square_crop():
    image = _rgb(300, 400).astype(np.float32) / 255
    out = random_square_crop(image, CROP, np.random.default_rng(0))
    assert out.shape == (CROP, CROP, 3) and out.dtype == np.float32
    # Not resized: the crop is a window of the image.
    found = False
    for top in range(300 - CROP + 1):
        row = np.where(np.all(image[top, :, :] == out[0, 0], axis=-1))[0]
        for left in row:
            if left + CROP <= 400 and np.array_equal(image[top : top + CROP, left : left + CROP], out):
                found = True
                break
        if found:
            break
    assert found
    again = random_square_crop(image, CROP, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)


def test_random_square_crop_small_image():
    tiny = np.clip(_rgb(60, 100).astype(np.float32) / 255 * 1.2, 0, 1)
    out = random_square_crop(tiny, CROP, np.random.default_rng(1))
    assert out.shape == (CROP, CROP, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    center = center_square_crop(tiny, CROP)
    assert center.shape == (CROP, CROP, 3) and 0.0 <= center.min() and center.max() <= 1.0


def test_center_square_crop_exact():
    image = np.arange(10 * 12 * 3, dtype=np.float32).reshape(10, 12, 3) / 360
    out = center_square_crop(image, 4)
    np.testing.assert_array_equal(out, image[3:7, 4:8])


def test_augment():
    image = np.random.default_rng(0).random((5, 7, 3), dtype=np.float32)
    shapes = set()
    for seed in range(20):
        out = augment(image, np.random.default_rng(seed))
        assert out.flags.c_contiguous and out.dtype == np.float32
        shapes.add(out.shape)
        assert np.isclose(np.sort(out.ravel()), np.sort(image.ravel())).all()
    assert shapes == {(5, 7, 3), (7, 5, 3)}
    readonly = image.copy()
    readonly.flags.writeable = False
    assert augment(readonly, np.random.default_rng(0)).flags.writeable


# ----------------------------------------------------------------------------- batches


def _images(n: int = 5) -> list[np.ndarray]:
    sizes = [(300, 260), (240, 400), (60, 100), (256, 256), (230, 231)]
    return [_rgb(h, w, seed=i).astype(np.float32) / 255 for i, (h, w) in enumerate(sizes[:n])]


def test_crop_batches_deterministic():
    import torch

    images = _images()
    batches = CropBatches(images, batch_size=2, crop=CROP, seed=11)
    assert batches.steps_per_epoch == 3 == len(batches)
    first = batches.batch(0, 0)
    assert isinstance(first, torch.Tensor)
    assert first.shape == (2, 3, CROP, CROP) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert batches.batch(0, 2).shape == (1, 3, CROP, CROP)  # last batch smaller
    # Same (seed, epoch, step) -> same tensor, also from a fresh object (resume).
    fresh = CropBatches(images, batch_size=2, crop=CROP, seed=11)
    assert torch.equal(first, fresh.batch(0, 0))
    assert torch.equal(batches.batch(3, 1), fresh.batch(3, 1))
    # Another epoch or another seed -> different batch.
    assert not torch.equal(first, batches.batch(1, 0))
    other_seed = CropBatches(images, batch_size=2, crop=CROP, seed=12)
    assert not torch.equal(first, other_seed.batch(0, 0))
    # An epoch visits every image once.
    order = batches.order(4)
    assert sorted(order.tolist()) == list(range(5))
    assert len(list(batches.iter_epoch(0))) == 3
    resumed = list(batches.iter_epoch(0, start_step=1))
    assert len(resumed) == 2 and torch.equal(resumed[0], batches.batch(0, 1))
    with pytest.raises(IndexError):
        batches.batch(0, 3)


def test_crop_batches_formula():
    """Batch content follows the documented seeding exactly."""
    images = _images()
    batches = CropBatches(images, batch_size=2, crop=64, seed=5)
    epoch, step = 2, 1
    perm = np.random.default_rng([5, epoch]).permutation(5)
    index = int(perm[2])
    rng = np.random.default_rng([5, epoch, index])
    expected = augment(random_square_crop(images[index], 64, rng), rng)
    got = batches.batch(epoch, step)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_val_batches():
    import torch

    images = _images()
    out = val_batches(images, crop=CROP, batch_size=2)
    assert [tuple(b.shape) for b in out] == [(2, 3, CROP, CROP), (2, 3, CROP, CROP), (1, 3, CROP, CROP)]
    again = val_batches(images, crop=CROP, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert all(0.0 <= float(b.min()) and float(b.max()) <= 1.0 for b in out)


def test_images_import_where_torch_cannot():
    """bilalora.images serves the torch-free runtime: it must import and decode where ``import torch`` fails."""
    code = (
        "import numpy as np, tempfile, os\n"
        "from PIL import Image\n"
        "import bilalora.images as im, bilalora.data\n"
        "d = tempfile.mkdtemp(); Image.fromarray(np.full((4, 6, 3), 255, np.uint8)).save(os.path.join(d, 'a.png'))\n"
        "x = im.load_image(os.path.join(d, 'a.png')); assert x.shape == (4, 6, 3) and float(x.max()) == 1.0\n"
    )
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr


def test_data_reexports_the_reading_side_from_images():
    from bilalora import data, images

    for name in ("IMAGE_SUFFIXES", "ImageDecodeError", "ImageFolder", "downsize", "list_images", "load_image"):
        assert getattr(data, name) is getattr(images, name)


def test_is_image_path_by_name_only(tmp_path):
    assert is_image_path("x/photo.JPG") and is_image_path(tmp_path / "never-written.webp")
    assert not is_image_path("x/._photo.jpg") and not is_image_path("clip.mp4") and not is_image_path("notes")
    assert IMAGE_SUFFIXES + (".mp4",) == (*IMAGE_SUFFIXES, ".mp4")  # a tuple: concatenates with video suffixes


def test_import_without_torch():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys, bilalora.data; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_downsize_keeps_uint8_and_clips_float():
    from bilalora.images import downsize

    u8 = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    small = downsize(u8, 50)
    assert small.dtype == np.uint8 and small.shape == (20, 50, 3)
    f = np.ones((40, 100, 3), np.float32)
    out = downsize(f, 25)
    assert out.dtype == np.float32 and out.shape == (10, 25, 3) and float(out.max()) <= 1.0
    assert downsize(u8, 100) is u8 and downsize(u8, None) is u8
