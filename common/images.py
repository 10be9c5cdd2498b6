"""Cheap checks on encoded image bytes, before anything expensive decodes them.

Reads only the JPEG/PNG headers (common.image_headers, which the model server
uses for its own bound too), so a decompression bomb (a tiny file that claims
30000 x 30000 pixels) is refused before a single pixel is allocated, also when
bytes follow the end of the image, and a truncated upload is refused instead
of being classified half-grey.
Every refusal is an `InvalidImage` whose message a person can act on; the
services turn it into INVALID_ARGUMENT.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.image_headers import JPEG_MAGIC, MAX_STEPS, PNG_MAGIC, SizeClaim, claimed_size, jpeg_scan_start, png_has_end

MIB = 1024 * 1024
DEFAULT_MAX_BYTES = 20 * MIB
# Decoding costs time and memory by the pixel (a 49-megapixel PNG: ~1 s of CPU across the
# three services, against ~55 ms for a photo), while the pipeline shrinks every photo anyway:
# the logo stage to 640 px (logo_service.features.MAX_SIDE), the model to its input size
# (256 px). 16.8 megapixels is a 4096 x 4096 image, more than a 12-megapixel phone photo.
DEFAULT_MAX_PIXELS = 4096 * 4096
PIPELINE_NOTE = "the pipeline shrinks every photo to at most 640 px (logo stage) and 256 px (model) before it looks"
DEFAULT_MIN_SIDE = 16


class InvalidImage(ValueError):
    """The bytes are not an image we can recognise; the message says what to send instead."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "jpeg" or "png"
    width: int
    height: int
    color: str  # e.g. "ycbcr", "gray", "cmyk", "rgba"
    size_bytes: int


def validate_image(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_side: int = DEFAULT_MIN_SIDE) -> ImageInfo:
    """Header-level checks; raises InvalidImage with a human message."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes): send the encoded JPEG or PNG file's bytes")
    if len(data) > max_bytes:
        raise InvalidImage(
            f"the image is {len(data) / MIB:.1f} MiB, over the {max_bytes / MIB:.0f} MiB limit: "
            "send a smaller file (e.g. re-encode at JPEG quality 90)")
    if not data.startswith((JPEG_MAGIC, PNG_MAGIC)):
        raise InvalidImage(
            f"not a JPEG or PNG image (the file starts with {data[:8].hex(' ')}): "
            "send the encoded JPEG or PNG bytes, not raw pixels, text or another format")
    claim = claimed_size(data)
    if claim is None:
        kind, header = ("JPEG", "frame header") if data.startswith(JPEG_MAGIC) else ("PNG", "IHDR header")
        raise InvalidImage(f"the {kind} is truncated or corrupt (no {header}): send the complete file")
    if claim.pixels > max_pixels:  # before any other check: a bomb is refused as one, whatever else is wrong
        raise InvalidImage(too_many_pixels(claim, max_pixels))
    _check_complete(data, claim)
    if claim.width < min_side or claim.height < min_side:
        raise InvalidImage(f"the image is {claim.width}x{claim.height} px, too small to recognise a car: "
                           f"send at least {min_side}x{min_side} px")
    return ImageInfo(format=claim.format, width=claim.width, height=claim.height, color=claim.color,
                     size_bytes=len(data))


def too_many_pixels(claim: SizeClaim, max_pixels: int) -> str:
    if claim.unbounded:
        return (f"the {claim.format.upper()} file's headers go on for more than {MAX_STEPS} chunks or segments, "
                "more than any image has, so its size cannot be read: re-export it")
    size = f"{claim.width}x{claim.height} px"
    if claim.frames > 1:
        size = f"{claim.frames} frames of up to {size}"
    return (f"the image is {size} ({claim.pixels / 1e6:.1f} megapixels), over the "
            f"{max_pixels / 1e6:.1f} megapixel limit; {PIPELINE_NOTE}, so downscale it "
            f"(e.g. to at most 2048 px on the longer side) and send it again")


def _check_complete(data: bytes, claim: SizeClaim) -> None:
    """Refuse a cut-off upload, which a decoder would fill with grey instead of failing."""
    if claim.format == "jpeg":
        scan = jpeg_scan_start(data)
        if scan < 0:
            raise InvalidImage("the JPEG is truncated or corrupt (no image data): send the complete file")
        if data.rfind(b"\xff\xd9") <= scan:
            raise InvalidImage("the JPEG is truncated (it has no end-of-image marker): "
                               "the upload was cut off; send the complete file")
        if claim.width == 0 or claim.height == 0:
            raise InvalidImage("the JPEG header says the image has no pixels: re-export the photo")
    elif not png_has_end(data):
        raise InvalidImage("the PNG is truncated (its chunks end before an IEND chunk): "
                           "the upload was cut off; send the complete file")
