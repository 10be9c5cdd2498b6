"""Real and deliberately broken images for the tests (built in memory, never committed)."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from common.data import data_dir

PHOTOS = data_dir() / "stanford_cars" / "images"


def photo(image_id: str) -> bytes:
    return (PHOTOS / f"{image_id}.jpg").read_bytes()


def decoded(image_id: str) -> np.ndarray:
    return cv2.imread(str(PHOTOS / f"{image_id}.jpg"))


def png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def truncated_jpeg(image_id: str) -> bytes:
    data = photo(image_id)
    return data[: len(data) // 2]


def one_pixel_png() -> bytes:
    return png(np.zeros((1, 1, 3), np.uint8))


def decompression_bomb_png(side: int = 100_000) -> bytes:
    """A tiny, complete PNG whose header claims side x side pixels of zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def cmyk_jpeg(image_id: str) -> bytes:
    out = io.BytesIO()
    Image.open(PHOTOS / f"{image_id}.jpg").convert("CMYK").save(out, "JPEG", quality=92)
    return out.getvalue()


def grayscale_jpeg(image_id: str) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(decoded(image_id), cv2.COLOR_BGR2GRAY))
    return data.tobytes()


def rgba_png(image_id: str) -> bytes:
    image = cv2.cvtColor(decoded(image_id), cv2.COLOR_BGR2BGRA)
    image[..., 3] = 200
    return png(image)


def big_png(image_id: str, min_bytes: int = 5 * 1024 * 1024) -> bytes:
    """A real photo upscaled and saved as PNG until it is over `min_bytes` (default 5 MiB)."""
    image = decoded(image_id)
    scale = 4
    while True:
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        noisy = cv2.add(big, np.random.default_rng(0).integers(0, 8, big.shape, dtype=np.uint8))
        data = png(noisy)
        if len(data) >= min_bytes:
            return data
        scale += 2
