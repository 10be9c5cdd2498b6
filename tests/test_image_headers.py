"""common.image_headers: the size an image's headers claim, read as leniently as the decoders read them."""
from __future__ import annotations

import io
import random
import struct
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from common.image_headers import claimed_size
from common.images import DEFAULT_MAX_PIXELS, InvalidImage, validate_image
from tests import images


def encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_claims_equal_the_decoded_size_of_real_files(fmt):
    pixels = cv2.cvtColor(images.decoded("00001"), cv2.COLOR_BGR2RGB)
    claim = claimed_size(encoded(pixels, fmt))
    assert (claim.format, claim.width, claim.height) == (fmt.lower(), pixels.shape[1], pixels.shape[0])
    assert claim.pixels == pixels.shape[0] * pixels.shape[1]
    assert claimed_size(encoded(pixels, "WEBP", lossless=True)).width == pixels.shape[1]  # VP8L


def test_bytes_after_the_end_do_not_hide_a_png_bomb():
    """Issue 24: a 10000 x 10000 PNG with 64 zero bytes after IEND was decoded by the model server."""
    bomb = images.decompression_bomb_png(10_000) + bytes(64)
    claim = claimed_size(bomb)
    assert (claim.width, claim.height) == (10_000, 10_000)
    with pytest.raises(InvalidImage, match="megapixel"):
        validate_image(bomb)


def test_a_truncated_or_padded_jpeg_still_shows_its_frame_header():
    photo = images.photo("00001")
    sof = photo.find(b"\xff\xc0")
    bomb = bytearray(photo)
    bomb[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)
    bomb = bytes(bomb)
    assert claimed_size(bomb[:len(bomb) // 2]).pixels == 60_000 ** 2  # no end-of-image marker
    padded = bomb[:sof] + b"\x00garbage\x00" + bomb[sof:]  # libjpeg skips bytes between segments
    assert claimed_size(padded).pixels == 60_000 ** 2
    with pytest.raises(InvalidImage, match="megapixel"):
        validate_image(padded)
    second = bomb[:sof] + photo[sof:photo.find(b"\xff\xda")] + bomb[sof:]  # two frame headers: the larger counts
    assert claimed_size(second).pixels == 60_000 ** 2


def test_every_gif_frame_counts_not_the_screen_size():
    frame = encoded(np.zeros((3000, 3000), np.uint8), "GIF")
    small_screen = bytearray(frame)
    small_screen[6:10] = struct.pack("<HH", 16, 16)  # TensorFlow decodes the frame at 3000 x 3000 regardless
    claim = claimed_size(bytes(small_screen))
    assert (claim.width, claim.height, claim.pixels) == (3000, 3000, 9_000_000)
    frames = [Image.fromarray(np.full((2000, 2000), i, np.uint8)) for i in range(5)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    claim = claimed_size(out.getvalue())
    assert claim.frames == 5 and claim.pixels == 5 * 2000 * 2000 > DEFAULT_MAX_PIXELS


def test_png_with_trailing_bytes_is_accepted_and_a_cut_one_refused():
    photo = images.png(images.decoded("00001"))
    assert validate_image(photo + bytes(64)).format == "png"
    with pytest.raises(InvalidImage, match="truncated"):
        validate_image(photo[:len(photo) // 2])


def test_damaged_bytes_never_raise():
    rng = random.Random(0)
    seeds = [images.photo("00001"), images.png(images.decoded("00002")),
             encoded(np.zeros((40, 40), np.uint8), "GIF"), encoded(np.zeros((40, 40, 3), np.uint8), "WEBP"),
             encoded(np.zeros((40, 40, 3), np.uint8), "BMP")]
    for seed in seeds:
        for _ in range(300):
            data = bytearray(seed[:rng.randrange(1, len(seed) + 1)])
            for _ in range(rng.randrange(4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            claim = claimed_size(bytes(data))
            assert claim is None or claim.pixels >= 0


def test_headers_built_to_be_walked_are_refused_quickly():
    photo = images.photo("00001")
    sof = photo.find(b"\xff\xc0")
    flooded = {
        "jpeg": photo[:sof] + b"\xff\xd0" * 5_000_000 + photo[sof:],  # 10 MB of restart markers, libjpeg skips them
        "gif": (b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0) + b"\x21\xfe" + b"\x01\x00" * 5_000_000
                + b"\x00\x3b"),  # a comment of 5 million 1-byte sub-blocks
    }
    for fmt, data in flooded.items():
        started = time.monotonic()
        claim = claimed_size(data)
        assert claim.format == fmt and claim.unbounded and time.monotonic() - started < 1.0, fmt
    with pytest.raises(InvalidImage, match="re-export"):
        validate_image(flooded["jpeg"])
