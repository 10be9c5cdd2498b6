"""Find the car before naming it: the localiser model, and the crop the classifier sees.

The classifiers were trained on tight crops of cars; users send whole photos.
So the router first asks the `localizer` model (served by TF Serving like the
classifiers, see training/localizer.py) for the boxes of the cars in the
photo, then cuts the largest one, with a small margin, out of the photo *as
uploaded* (not a downscaled copy: a 12-megapixel phone photo keeps the pixels
of its car, which the logo stage needs for emblems) and sends that crop to the
classifier and the logo stage.

A photo that is already a tight crop (the box, with its margin, covers nearly
all of it) is classified as sent, so its answer does not change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import grpc
import numpy as np

from router_service.tf_serving import TfServingClient, warmup_image

INPUT_KEY = "image_bytes"
OUTPUTS = ["boxes", "scores", "car_count", "car_probability"]
WHOLE = (0.0, 0.0, 1.0, 1.0)
MIN_CROP_SIDE = 16  # pixels; a smaller box is refused (caller's) or not cropped (localiser's)


@dataclass(frozen=True)
class Localization:
    """What the localiser found in one photo."""

    boxes: np.ndarray  # [cars, 4] x_min, y_min, x_max, y_max in [0, 1], largest first
    scores: np.ndarray  # [cars]
    car_probability: float
    version: int

    @property
    def cars(self) -> int:
        return len(self.boxes)


class Localizer:
    """Calls the localiser model through TF Serving's Predict."""

    def __init__(self, client: TfServingClient, model_name: str, signature: str = "serving_default") -> None:
        self.client = client
        self.model_name = model_name
        self.signature = signature
        self.version = 0  # the last version that answered, for ListModels
        self.error = ""  # the last failure, "" after a success

    async def check(self, timeout: float) -> bool:
        """One Predict on a small synthetic photo: learns the served version for ListModels (and warms the
        path); a failure is recorded in `error`, never raised."""
        try:
            await self.locate(warmup_image(), timeout)
        except (grpc.aio.AioRpcError, ValueError) as exc:
            self.error = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            return False
        self.error = ""
        return True

    async def locate(self, image: bytes, timeout: float | None) -> Localization:
        """Raises grpc.aio.AioRpcError when the model server fails, like any Predict."""
        outputs, version = await self.client.predict_outputs(self.model_name, self.signature, INPUT_KEY, [image],
                                                             OUTPUTS, timeout)
        missing = [key for key in OUTPUTS if key not in outputs]
        if missing:
            raise ValueError(f"model {self.model_name!r} did not return {missing}: is it a localiser?")
        count = int(outputs["car_count"][0])
        self.version = version
        return Localization(boxes=np.asarray(outputs["boxes"][0][:count], np.float32),
                            scores=np.asarray(outputs["scores"][0][:count], np.float32),
                            car_probability=float(outputs["car_probability"][0]), version=version)


def box_problem(box: tuple[float, float, float, float], width: int, height: int) -> str | None:
    """Why a caller's box cannot be classified, in a sentence; None when it can."""
    x_min, y_min, x_max, y_max = box
    if not all(math.isfinite(v) for v in box):
        return "car_box has a coordinate that is not a finite number"
    if min(box) < 0.0 or max(box) > 1.0:
        return (f"car_box ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) lies outside the image: coordinates are "
                "fractions of the width and height, in [0, 1]")
    if x_max <= x_min or y_max <= y_min:
        return (f"car_box ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) is empty: x_max must exceed x_min and "
                "y_max y_min")
    w, h = (x_max - x_min) * width, (y_max - y_min) * height
    if min(w, h) < MIN_CROP_SIDE:
        return (f"car_box is {w:.0f} x {h:.0f} pixels of this {width} x {height} image, under the "
                f"{MIN_CROP_SIDE}-pixel minimum: send a larger box or the whole photo")
    return None


def with_margin(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    """The box grown by `margin` of its width and height on every side, clipped to the photo."""
    x_min, y_min, x_max, y_max = box
    dx, dy = (x_max - x_min) * margin, (y_max - y_min) * margin
    return max(0.0, x_min - dx), max(0.0, y_min - dy), min(1.0, x_max + dx), min(1.0, y_max + dy)


def covers_photo(box: tuple[float, float, float, float], share: float) -> bool:
    """True when the box spans at least `share` of both the photo's width and its height."""
    return box[2] - box[0] >= share and box[3] - box[1] >= share


def crop_encoded(image: bytes, box: tuple[float, float, float, float], quality: int = 95) -> bytes | None:
    """The box cut from the photo at its uploaded resolution, as a JPEG; None when OpenCV cannot decode it
    (the caller then classifies the photo whole, and the model server gives its own verdict on the bytes).

    EXIF orientation is ignored, as TensorFlow's decoder (the localiser's) ignores it, so the box
    means the same pixels here as there."""
    pixels = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        return None
    height, width = pixels.shape[:2]
    left, top = int(math.floor(box[0] * width)), int(math.floor(box[1] * height))
    right, bottom = int(math.ceil(box[2] * width)), int(math.ceil(box[3] * height))
    if min(right - left, bottom - top) < MIN_CROP_SIDE:
        return None
    ok, encoded = cv2.imencode(".jpg", pixels[top:bottom, left:right], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes() if ok else None
