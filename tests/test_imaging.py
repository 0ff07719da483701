import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busdx.data.imaging import decode_image, is_image_file, load_image
from busdx.data.synthetic import decompression_bomb_png
from busdx.errors import ImageDecodeError, ImageTooLargeError


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 32x64, 0..252


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "CMYK"])
def test_every_8bit_mode_becomes_rgb(tmp_path, mode):
    image = Image.fromarray(GRADIENT, "L").convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    loaded = load_image(_save(image, tmp_path / f"x{suffix}"))
    assert loaded.mode == "RGB" and loaded.size == (64, 32)
    gray = np.asarray(loaded)[..., 0].astype(int)
    assert np.abs(gray - GRADIENT).max() <= (12 if mode == "CMYK" else 1)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    array = (GRADIENT.astype(np.uint16) * 200).astype(np.uint16)  # up to 50,400
    loaded = np.asarray(load_image(_save(Image.fromarray(array), tmp_path / "x16.png")))
    assert loaded.shape == (32, 64, 3)
    assert loaded.min() == 0 and loaded.max() == 255
    assert np.all(np.diff(loaded[0, :, 0].astype(int)) >= 0)  # order preserved


def test_multi_frame_tiff_uses_first_frame(tmp_path):
    frames = [Image.new("L", (8, 8), value) for value in (10, 200)]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0, 0] == 10


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_non_image_with_image_extension(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels")
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_png(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
        buffer, "PNG"
    )
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        load_image(tmp_path / "cut.png")


def test_extensions_any_case_and_masks_excluded():
    assert is_image_file(Path("a/benign (1).PNG")) and is_image_file(Path("x.JpEg"))
    assert is_image_file(Path("x.bmp")) and is_image_file(Path("x.tif"))
    assert not is_image_file(Path("benign (1)_mask.png"))
    assert not is_image_file(Path("benign (1)_mask_1.png"))
    assert not is_image_file(Path("notes.txt"))


def test_a_decompression_bomb_is_refused_with_a_decode_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(decompression_bomb_png())  # 30000 x 30000, ~100 KB
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: .*900000000 pixels"):
        load_image(tmp_path / "bomb.png")
    small = decompression_bomb_png(400)  # the same file, small: below every limit, it decodes
    assert load_image(_save_bytes(small, tmp_path / "small.png")).size == (400, 400)
    with pytest.raises(ImageTooLargeError, match="400x400 pixels exceeds the limit of 1,000"):
        decode_image(small, "small.png", max_pixels=1_000)


def test_images_between_pillows_warning_and_our_limit_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow warns above 100, errs above 200
    image = load_image(_save(Image.new("L", (12, 12)), tmp_path / "x.png"))  # 144 pixels
    assert image.size == (12, 12)


def _save_bytes(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path
