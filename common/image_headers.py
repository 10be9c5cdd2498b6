"""What an encoded image claims it decodes to, read from its headers without decoding a pixel.

A decoder allocates what the header says, so a small file can claim gigabytes (a
decompression bomb). `claimed_size` reads every format TensorFlow's `decode_image`
accepts (JPEG, PNG, GIF, BMP, WebP) as leniently as those decoders read them, so
that nothing a decoder would decode escapes the bound:

- bytes after the end of the image are ignored (libpng stops at IEND, libjpeg at EOI);
- a truncated body does not hide the header in front of it;
- bytes between JPEG segments are skipped, as libjpeg's `next_marker` skips them;
- every frame counts: a GIF decoder reads all of them, each at its own size, onto a
  canvas as large as the largest (the screen size in the file header is not used).

None means no header claims a size: the bytes are not one of these formats, or are
too damaged for any decoder to start (it then fails with its own error). A walk over
the headers stops after MAX_STEPS chunks, segments or sub-blocks (real files need far
fewer): such a file claims UNBOUNDED pixels, so the bound refuses it rather than
spend seconds of Python on a file built to be walked.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions (baseline, progressive, lossless, arithmetic, hierarchical).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: markers without a length
_PNG_COLOR = {0: "gray", 2: "rgb", 3: "palette", 4: "gray+alpha", 6: "rgba"}
_JPEG_COLOR = {1: "gray", 3: "ycbcr", 4: "cmyk"}
# A 20 MB GIF of 255-byte sub-blocks takes ~80 000 steps; 200 000 take about 0.1 s.
MAX_STEPS = 200_000
UNBOUNDED = 2 ** 63 - 1


class _TooLong(Exception):
    """The headers go on for more than MAX_STEPS."""


class _Budget:
    """The steps left to walk one image's headers."""

    def __init__(self) -> None:
        self.left = MAX_STEPS

    def take(self) -> bool:
        """True, or _TooLong once MAX_STEPS are spent."""
        self.left -= 1
        if self.left < 0:
            raise _TooLong
        return True


@dataclass(frozen=True)
class SizeClaim:
    """What decoding one encoded image would produce, by its headers."""

    format: str  # "jpeg", "png", "gif", "bmp", "webp"
    width: int  # the canvas: for an animation, as wide and high as its largest frame
    height: int
    pixels: int  # pixels a decoder fills: width x height, or every frame's together for an animation
    frames: int = 1
    color: str = ""

    @property
    def unbounded(self) -> bool:
        """The headers were too long to read to the end (MAX_STEPS): assume the worst."""
        return self.pixels == UNBOUNDED


def claimed_size(data: bytes) -> SizeClaim | None:
    """The size the headers of a JPEG, PNG, GIF, BMP or WebP claim; None when none does. Never raises."""
    try:
        if data.startswith(JPEG_MAGIC):
            return _jpeg(data)
        if data.startswith(PNG_MAGIC):
            return _png(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if data.startswith(b"BM"):
            return _bmp(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
    except (struct.error, IndexError, ValueError):
        return None
    except _TooLong:
        return SizeClaim(_format(data), 0, 0, UNBOUNDED)
    return None


def _format(data: bytes) -> str:
    for magic, name in ((JPEG_MAGIC, "jpeg"), (PNG_MAGIC, "png"), (b"GIF8", "gif"), (b"BM", "bmp")):
        if data.startswith(magic):
            return name
    return "webp"


def jpeg_scan_start(data: bytes) -> int:
    """Where the first scan (SOS) of a JPEG starts, -1 when it has none (or no walk finds it)."""
    try:
        return _jpeg_walk(data)[1]
    except _TooLong:
        return -1


def png_has_end(data: bytes) -> bool:
    """True when the PNG's chunks lead to an IEND chunk within the file (bytes after it are allowed)."""
    pos = len(PNG_MAGIC)
    for _ in range(MAX_STEPS):
        if pos + 8 > len(data):
            break
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos += 12 + length  # length, type, data, CRC
    return False


def _jpeg_walk(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The frame headers (width, height, components) before the first scan, and where that scan starts (-1)."""
    frames: list[tuple[int, int, int]] = []
    pos = 2
    budget = _Budget()
    while budget.take() and (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        marker = data[pos + 1]
        if marker in (0xFF, 0x00):  # a fill byte, or a stuffed zero that is no marker: keep looking
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == _JPEG_EOI or pos + 4 > len(data):
            break
        if marker in _SOF_MARKERS and pos + 10 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            frames.append((width, height, data[pos + 9]))
        if marker == _JPEG_SOS:
            return frames, pos
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return frames, -1


def _jpeg(data: bytes) -> SizeClaim | None:
    # libjpeg refuses a second frame header; the largest one is the safe reading of such a file.
    frames, _ = _jpeg_walk(data)
    if not frames:
        return None
    width, height, components = max(frames, key=lambda f: f[0] * f[1])
    return SizeClaim("jpeg", width, height, width * height,
                     color=_JPEG_COLOR.get(components, f"{components}-channel"))


def _png(data: bytes) -> SizeClaim | None:
    # IHDR is always the first chunk (libpng refuses any other order); APNG frames fit inside it.
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    color = _PNG_COLOR.get(data[25], f"type-{data[25]}") if len(data) > 25 else ""
    return SizeClaim("png", width, height, width * height, color=color)


def _skip_sub_blocks(data: bytes, pos: int, budget: _Budget) -> int:
    """Past a GIF data-sub-block sequence (size byte, data, ..., 0)."""
    while budget.take() and pos < len(data) and data[pos]:
        pos += 1 + data[pos]
    return pos + 1


def _gif(data: bytes) -> SizeClaim:
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global colours
    frames: list[tuple[int, int]] = []
    budget = _Budget()
    while budget.take() and pos < len(data) and data[pos] != 0x3B:  # trailer
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2, budget)
        elif data[pos] == 0x2C and pos + 10 <= len(data):  # image descriptor: the decoder allocates its size
            frames.append(struct.unpack("<HH", data[pos + 5:pos + 9]))
            local = data[pos + 9]
            pos = _skip_sub_blocks(data, pos + 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1, budget)
        else:
            break
    if not frames:
        width, height = struct.unpack("<HH", data[6:10])
        return SizeClaim("gif", width, height, width * height, frames=0)
    width, height = max(f[0] for f in frames), max(f[1] for f in frames)
    return SizeClaim("gif", width, height, max(width * height, sum(w * h for w, h in frames)), frames=len(frames))


def _bmp(data: bytes) -> SizeClaim:
    # TensorFlow reads these two fields whatever the header version; a negative height means top-down.
    width, height = struct.unpack("<ii", data[18:26])
    return SizeClaim("bmp", abs(width), abs(height), abs(width * height))


def _webp(data: bytes) -> SizeClaim | None:
    canvas: tuple[int, int] | None = None
    frames: list[tuple[int, int]] = []
    pos = 12
    budget = _Budget()
    while budget.take() and pos + 8 <= len(data):
        kind, (length,) = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])
        body = data[pos + 8:pos + 8 + min(length, 30)]
        if kind == b"VP8X" and len(body) >= 10:
            canvas = (_le24(body, 4) + 1, _le24(body, 7) + 1)
        elif kind == b"ANMF" and len(body) >= 12:
            frames.append((_le24(body, 6) + 1, _le24(body, 9) + 1))
        elif kind == b"VP8 " and len(body) >= 10 and canvas is None:
            canvas = (struct.unpack("<H", body[6:8])[0] & 0x3FFF, struct.unpack("<H", body[8:10])[0] & 0x3FFF)
        elif kind == b"VP8L" and len(body) >= 5 and canvas is None:
            bits = struct.unpack("<I", body[1:5])[0]
            canvas = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    if canvas is None:
        return None
    width, height = canvas
    return SizeClaim("webp", width, height, max(width * height, sum(w * h for w, h in frames)),
                     frames=max(1, len(frames)))


def _le24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 3], "little")
