"""Property-based tests of the image decoder: whatever bytes arrive, the only possible outcomes
are an 8-bit RGB image or an :class:`ImageDecodeError`."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from busdx.data.imaging import decode_image
from busdx.errors import ImageDecodeError

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM", "TGA", "ICO", "PCX", "SGI", "DIB"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on damaged metadata
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A small image of any mode, saved in any format Pillow can write it in."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode not in {"I;16"} else (
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    )  # fmt: skip
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # this format cannot hold this mode
    return buffer.getvalue()


def _decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz", max_pixels=10_000_000)
    except ImageDecodeError as exc:
        assert str(exc).startswith("fuzz: ") and "\n" not in str(exc)
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@FUZZ
@given(encoded_images())
def test_every_mode_and_format_pillow_writes_decodes_to_rgb(data):
    image = decode_image(data, "fuzz")
    assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8


@FUZZ
@given(encoded_images(), st.floats(0.0, 1.0))
def test_truncated_files(data, fraction):
    _decodes_or_refuses(data[: int(len(data) * fraction)])


@FUZZ
@given(encoded_images(), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=8))
def test_flipped_bits(data, flips):
    damaged = bytearray(data)
    for where, bit in flips:
        damaged[min(int(where * len(damaged)), len(damaged) - 1)] ^= 1 << bit
    _decodes_or_refuses(bytes(damaged))


@FUZZ
@given(encoded_images(), st.binary(min_size=1, max_size=32))
def test_wrong_or_overwritten_headers(data, header):
    _decodes_or_refuses(header + data[len(header) :])
    _decodes_or_refuses(header + data)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    _decodes_or_refuses(data)


@pytest.mark.parametrize(
    "signature",
    [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF"],
)
def test_a_bare_signature_is_refused(signature):
    with pytest.raises(ImageDecodeError):
        decode_image(signature, "fuzz")
