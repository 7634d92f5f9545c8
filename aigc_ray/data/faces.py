"""Faces from everyday photos: the largest face, found by OpenCV's Haar cascade, cropped square with a margin
and turned so the eyes are level (where both are found). A photo without a face is skipped, never squashed.

    box = find_face(gray)                       # (x, y, w, h) of the largest face, or None
    face = crop_face(rgb, size=64)              # uint8 (64, 64, 3), or None when there is no face

`--face-crop` on a folder dataset runs this on every photo while decoding (data.folders), and says in one line how
many photos had no face. The cascades ship inside the opencv-python-headless wheel (cv2.data.haarcascades;
pinned below 5, whose wheel has none): nothing is downloaded.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

MARGIN = 0.1  # the crop is the face box grown by this share of its side on every edge (ORL: its square)
MIN_FACE = 24  # pixels: smaller detections are noise at these image sizes


@lru_cache(maxsize=1)
def _cascades():
    import cv2  # OpenCV (~0.3 s to import) only when a face is cropped

    face = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    eye = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_eye.xml")
    if face.empty() or eye.empty():
        raise RuntimeError(f"OpenCV's Haar cascades are missing under {cv2.data.haarcascades} "
                           "(opencv-python-headless<5 ships them)")
    return face, eye


def find_face(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """The largest frontal face in a grayscale uint8 image: (x, y, w, h), or None."""
    face, _ = _cascades()
    found = face.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE))
    if len(found) == 0:
        return None
    x, y, w, h = max(found, key=lambda b: b[2] * b[3])
    return int(x), int(y), int(w), int(h)


def eye_angle(gray: np.ndarray, box: tuple[int, int, int, int]) -> float | None:
    """The angle (degrees) of the line through the two eyes found in the face's upper half, or None."""
    _, eye = _cascades()
    x, y, w, h = box
    eyes = eye.detectMultiScale(gray[y:y + h * 5 // 8, x:x + w], scaleFactor=1.1, minNeighbors=5,
                                minSize=(max(4, w // 10), max(4, w // 10)))
    if len(eyes) < 2:
        return None
    a, b = sorted(sorted(eyes, key=lambda e: e[2] * e[3])[-2:], key=lambda e: e[0])  # the two largest, left first
    (ax, ay), (bx, by) = (a[0] + a[2] / 2, a[1] + a[3] / 2), (b[0] + b[2] / 2, b[1] + b[3] / 2)
    if bx - ax < w / 5:  # one eye found twice
        return None
    angle = math.degrees(math.atan2(by - ay, bx - ax))
    return angle if abs(angle) <= 30 else None


def crop_box(box: tuple[int, int, int, int], margin: float = MARGIN) -> tuple[int, int, int, int]:
    """The square (x, y, side, side) around a face box, grown by margin on every edge."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * margin)))
    cx, cy = x + w / 2, y + h / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side, side


def crop_face(image: np.ndarray, size: int, margin: float = MARGIN) -> np.ndarray | None:
    """The largest face of an RGB or grayscale uint8 image, square, eyes level, resized to size; None without one."""
    import cv2

    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    box = find_face(gray)
    if box is None:
        return None
    x, y, side, _ = crop_box(box, margin)
    angle = eye_angle(gray, box)
    if angle:  # turn about the face's centre so the eyes are level
        rot = cv2.getRotationMatrix2D((x + side / 2, y + side / 2), angle, 1.0)
        image = cv2.warpAffine(image, rot, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    pad = side  # a face near the edge: extend the photo by its border pixels rather than shift the crop
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    face = padded[y + pad:y + pad + side, x + pad:x + pad + side]
    return cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
