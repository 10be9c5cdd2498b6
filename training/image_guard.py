"""The in-graph image-size guard of the served SavedModels, and a tool that adds it to an exported one.

TensorFlow Serving runs whatever the graph says: a 300 KB PNG that claims
10000 x 10000 pixels is decoded into 300 MB (the stand-in measured 3.2 s and
1.5 GB). So every serving signature first reads each image's width and height
from its header (JPEG: `tf.io.extract_jpeg_shape`, which reads no pixels;
PNG, GIF, BMP: fixed header fields) and fails the request with
INVALID_ARGUMENT before decoding when one claims more than `max_pixels`. The
real TF Serving container is then protected as well as the stand-in.

New exports get the guard from `SignatureModule` (training/export.py). For a
model exported before it existed, this wraps the SavedModel's signatures and
saves a new version with the same weights:

    python -m training.image_guard --model efficientnet_lite0 --from-version 3 --version 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tensorflow as tf

from common.model_card import card_path, read_card, write_card
from common.images import DEFAULT_MAX_PIXELS, PIPELINE_NOTE

SERVING_MODELS = Path(__file__).resolve().parent.parent / "serving_models"


def _big_endian(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8), tf.int64)
    return tf.reduce_sum(raw * tf.constant([256 ** (length - 1 - i) for i in range(length)], tf.int64))


def _little_endian(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8), tf.int64)
    return tf.reduce_sum(raw * tf.constant([256 ** i for i in range(length)], tf.int64))


def claimed_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height that one encoded image's header claims (int64 scalar); 0 when the format is not
    one of these or the header is too short (decoding then fails with its own error)."""
    length = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 4)

    def jpeg() -> tf.Tensor:
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    def png() -> tf.Tensor:
        return _big_endian(data, 16, 4) * _big_endian(data, 20, 4)

    def gif() -> tf.Tensor:
        return _little_endian(data, 6, 2) * _little_endian(data, 8, 2)

    def bmp() -> tf.Tensor:
        height = _little_endian(data, 22, 4)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # top-down BMPs store -height
        return _little_endian(data, 18, 4) * height

    zero = lambda: tf.constant(0, tf.int64)  # noqa: E731
    return tf.case([
        (tf.logical_and(length >= 4, tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")), jpeg),
        (tf.logical_and(length >= 24, tf.equal(head, b"\x89PNG")), png),
        (tf.logical_and(length >= 10, tf.equal(head, b"GIF8")), gif),
        (tf.logical_and(length >= 26, tf.equal(tf.strings.substr(data, 0, 2), b"BM")), bmp),
    ], default=zero, exclusive=False)


def check_image_sizes(image_bytes: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Operation:
    """An op that fails with InvalidArgument when an image in the batch claims more than `max_pixels`."""
    pixels = tf.map_fn(claimed_pixels, image_bytes, fn_output_signature=tf.int64)
    message = (f"an image claims more than {max_pixels / 1e6:.1f} megapixels, the limit of this model; "
               f"{PIPELINE_NOTE}, so downscale it (e.g. to at most 2048 px on the longer side)")
    return tf.debugging.Assert(tf.reduce_all(pixels <= max_pixels), [message], summarize=1)


class GuardedSavedModel(tf.Module):
    """An exported SavedModel whose every signature checks image sizes first; weights and assets shared."""

    def __init__(self, inner: tf.Module, max_pixels: int) -> None:
        super().__init__(name="guarded")
        self.inner = inner  # tracked: its variables and label assets are saved again
        self.functions = {name: self._guarded(signature, max_pixels) for name, signature in inner.signatures.items()}

    @staticmethod
    def _guarded(signature, max_pixels: int):
        [input_key] = signature.structured_input_signature[1].keys()

        def serve(image_bytes):
            with tf.control_dependencies([check_image_sizes(image_bytes, max_pixels)]):
                return signature(**{input_key: tf.identity(image_bytes)})

        return tf.function(serve, input_signature=[tf.TensorSpec([None], tf.string, name=input_key)])

    def save(self, export_dir: Path) -> None:
        signatures = {name: fn.get_concrete_function() for name, fn in self.functions.items()}
        tf.saved_model.save(self, str(export_dir), signatures=signatures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.image_guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder under serving_models/")
    parser.add_argument("--from-version", type=int, required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--models-dir", type=Path, default=SERVING_MODELS)
    args = parser.parse_args(argv)
    source = args.models_dir / args.model / str(args.from_version)
    target = args.models_dir / args.model / str(args.version)
    if target.exists():
        sys.exit(f"{target} exists; choose another --version")
    started = time.time()
    GuardedSavedModel(tf.saved_model.load(str(source)), args.max_pixels).save(target)
    if card_path(source).exists():
        card = read_card(source)
        card["version"] = args.version
        card["image_guard"] = {
            "max_pixels": args.max_pixels,
            "what": "each signature refuses, before decoding, an image whose header claims more pixels",
            "made_from": f"version {args.from_version}, same weights and signatures",
            "command": "python -m training.image_guard " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.time() - started, 1),
        }
        write_card(target, card, indent=1)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
