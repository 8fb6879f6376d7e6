"""Loss-curve PNG: with matplotlib when it is installed, else a small built-in rasteriser (zlib PNG)."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

Points = Sequence[tuple[float, float]]

TRAIN_RGB = (70, 110, 200)
VALID_RGB = (215, 60, 40)


def plot_losses(path: str | Path, train: Points, valid: Points = (), title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_builtin(tmp, train, valid, title)
    else:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        if train:
            ax.plot(*zip(*train), color=[c / 255 for c in TRAIN_RGB], lw=1, label="train loss")
        if valid:
            ax.plot(*zip(*valid), "o-", color=[c / 255 for c in VALID_RGB], ms=3, label="valid loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ built-in rasteriser

# 3x5 glyphs: five rows of three columns ("#" = ink), rows separated by spaces.
_GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...",
    ":": "... .#. ... .#. ...", " ": "... ... ... ... ...", "a": "... .## #.# #.# .##",
    "d": "..# .## #.# #.# .##", "e": "... .#. ### #.. .##", "i": ".#. ... .#. .#. .#.",
    "k": "#.. #.# ##. #.# #.#", "l": "#.. #.. #.. #.. .##", "n": "... ##. #.# #.# #.#",
    "o": "... .#. #.# #.# .#.", "p": "... ##. #.# ##. #..", "r": "... #.# ##. #.. #..",
    "s": ".## #.. .#. ..# ##.", "t": ".#. ### .#. .#. ..#", "v": "... #.# #.# #.# .#.",
    "c": "... .## #.. #.. .##", "h": "#.. #.. ##. #.# #.#", "m": "... #.# ### #.# #.#",
    "u": "... #.# #.# #.# .##", "f": ".## #.. ##. #.. #..", "g": ".## #.# .## ..# ##.",
    "w": "... #.# #.# ### #.#", "x": "... #.# .#. .#. #.#", "y": "#.# #.# .## ..# ##.",
}
_FONT = {ch: rows.replace(" ", "") for ch, rows in _GLYPHS.items()}


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb, width: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(width):
                for oy in range(width):
                    self.dot(x0 + ox, y0 + oy, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, rgb=(40, 40, 40), scale: int = 2) -> None:
        for ch in s.lower():
            glyph = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for c in range(3):
                    if glyph[r * 3 + c] == "#":
                        for ox in range(scale):
                            for oy in range(scale):
                                self.dot(x + c * scale + ox, y + r * scale + oy, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _plot_builtin(path: Path, train: Points, valid: Points, title: str) -> None:
    w, h = 800, 500
    left, right, top, bottom = 70, 20, 40, 50
    cv = _Canvas(w, h)
    pts = list(train) + list(valid)
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[int, int]:
        return (
            int(left + (x - x0) / (x1 - x0) * (w - left - right)),
            int(h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)),
        )

    grid, axis = (230, 230, 230), (60, 60, 60)
    for tx in _ticks(x0, x1):
        x, _ = px(tx, y0)
        cv.line(x, top, x, h - bottom, grid)
        label = _fmt(tx)
        cv.text(x - len(label) * 4, h - bottom + 8, label)
    for ty in _ticks(y0, y1):
        _, y = px(x0, ty)
        cv.line(left, y, w - right, y, grid)
        label = _fmt(ty)
        cv.text(left - 8 - len(label) * 8, y - 5, label)
    cv.line(left, top, left, h - bottom, axis)
    cv.line(left, h - bottom, w - right, h - bottom, axis)
    for series, rgb, width in ((train, TRAIN_RGB, 1), (valid, VALID_RGB, 2)):
        prev = None
        for x, y in series:
            cur = px(x, y)
            if prev is not None:
                cv.line(*prev, *cur, rgb, width)
            if series is valid:
                for ox in range(-2, 3):
                    for oy in range(-2, 3):
                        cv.dot(cur[0] + ox, cur[1] + oy, rgb)
            prev = cur
    cv.text(w - right - 100, top - 30, "train", TRAIN_RGB)
    cv.text(w - right - 100, top - 16, "valid", VALID_RGB)
    cv.text(w // 2 - 16, h - 20, "step")
    cv.text(8, 10, "loss" + (" " + "".join(c for c in title.lower() if c in _FONT) if title else ""))
    path.write_bytes(cv.png())
