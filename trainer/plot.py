"""A loss-curve PNG without a plotting library: numpy rasterises, zlib compresses."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.tempfiles import write_bytes_atomic


def _png(pixels: np.ndarray) -> bytes:
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_losses(points: list[tuple[int, float]], path: Path, width: int = 640, height: int = 360) -> None:
    """Train loss per step (grey) and its 10-step moving average (blue) on a white canvas with axes."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    pad = 24
    img[height - pad, pad:width - pad] = 0   # x axis
    img[pad:height - pad, pad] = 0           # y axis
    if len(points) >= 2:
        steps = np.array([p[0] for p in points], dtype=float)
        loss = np.array([p[1] for p in points], dtype=float)
        lo, hi = float(loss.min()), float(loss.max()) or 1.0
        span = (hi - lo) or 1.0

        def xy(s, v):
            x = pad + 1 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * pad - 2)
            y = height - pad - 1 - (v - lo) / span * (height - 2 * pad - 2)
            return x, y

        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) >= 10 else loss
        for series, color, offset in ((loss, (170, 170, 170), 0), (smooth, (31, 119, 180), len(loss) - len(smooth))):
            xs, ys = xy(steps[offset:], series)
            for i in range(len(xs) - 1):  # draw each segment densely enough to be continuous
                n = int(max(abs(xs[i + 1] - xs[i]), abs(ys[i + 1] - ys[i]), 1)) * 2
                px = np.linspace(xs[i], xs[i + 1], n).round().astype(int)
                py = np.linspace(ys[i], ys[i + 1], n).round().astype(int)
                img[np.clip(py, 0, height - 1), np.clip(px, 0, width - 1)] = color
    write_bytes_atomic(Path(path), _png(img))
