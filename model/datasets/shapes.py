"""A synthetic fine-detail instance segmentation benchmark (``transfiner make-shapes``).

- Our stand-in for COCO / Cityscapes on machines without internet. Every image holds a few instances
  of a handful of categories whose boundaries carry detail that a 28x28 Mask R-CNN mask cannot
  represent once it is upsampled to the box: thin spikes, gear teeth, holes, thin rings, letter
  strokes, comb teeth and serrated edges. Objects are reasonably large (about 40-250 px on the
  default 384x384 canvas) and their category shows in both shape and colour, so a small model learns
  them quickly; the fine detail lives at a scale of a few pixels.
- Each instance is drawn as a 4x supersampled binary mask; its area coverage (the mean of the 4x4
  sub-pixels) is the alpha used to paint it, and ``coverage >= 0.5`` is its mask, so edges are crisp
  in the annotation and anti-aliased in the picture. Instances are painted in order over a textured
  background (low-frequency noise, gradients, stripes and low-contrast clutter shapes that are not
  instances); later ones cover earlier ones and the annotations store the visible parts only. An
  instance is only placed when it leaves every earlier instance at least ``min_visible_fraction`` of
  its area and ``min_area`` pixels, so no painted object is left unannotated and nothing is chopped
  into confetti.

Output, COCO format::

    OUT/annotations.json   images, annotations (compressed RLE with str counts), categories, info
    OUT/images/000000.png  ...

- Deterministic: image ``i`` of seed ``s`` is drawn from its own generator
  ``np.random.default_rng(np.random.SeedSequence(s, spawn_key=(i,)))``, so it is the same whether 3
  or 300 images are generated, and the same seed gives byte-identical files (with the same numpy /
  Pillow / zlib versions).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from functools import cache, lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

GENERATOR_VERSION = "1"
SUPERSAMPLE = 4
MIN_SIDE, MAX_SIDE = 64, 4096

CATEGORIES: list[dict] = [
    {"id": 1, "name": "star"},
    {"id": 2, "name": "gear"},
    {"id": 3, "name": "ring"},
    {"id": 4, "name": "letter"},
    {"id": 5, "name": "comb"},
    {"id": 6, "name": "leaf"},
    {"id": 7, "name": "cheese"},
]

# Category colour: a hue per category, evenly spread round the wheel (51 degrees apart); each
# instance draws its hue around it with a standard deviation of about 11 degrees.
_CATEGORY_HUES = [k / len(CATEGORIES) for k in range(len(CATEGORIES))]
_HUE_SIGMA = 0.03
# Instance diameter range (px on a 384 px canvas) per category, sampled log-uniformly.
_DIAMETERS = {
    "star": (40, 220),
    "gear": (40, 220),
    "ring": (40, 250),
    "letter": (40, 220),
    "comb": (50, 250),
    "leaf": (50, 250),
    "cheese": (40, 200),
}
_LETTERS = "ABEFGHKMNRSWXYZ2345689&"  # single connected piece in the built-in font


@dataclass(frozen=True)
class ShapesConfig:
    """What ``make_shapes`` generates. ``width`` x ``height`` is the canvas size in pixels."""

    num_images: int
    seed: int = 0
    width: int = 384
    height: int = 384
    min_instances: int = 2
    max_instances: int = 6
    min_area: int = 150  # visible pixels an instance must keep
    min_visible_fraction: float = 0.5  # of its own area an instance must keep visible

    def __post_init__(self) -> None:
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"the number of images must be at least 1, got {self.num_images!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"the seed must be a non-negative integer, got {self.seed!r}")
        for name in ("width", "height"):
            side = getattr(self, name)
            if not isinstance(side, int) or not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(f"image {name} must be an integer from {MIN_SIDE} to {MAX_SIDE}, got {side!r}")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 1 <= min_instances <= max_instances, got {self.min_instances} and {self.max_instances}"
            )
        if self.min_area < 1 or not 0.0 < self.min_visible_fraction <= 1.0:
            raise ValueError("min_area must be >= 1 and min_visible_fraction in (0, 1]")


@dataclass
class Instance:
    """One placed instance: its category id and its visible mask (bool, height x width)."""

    category_id: int
    mask: np.ndarray


# --------------------------------------------------------------------------- fonts


@cache
def _font_backend() -> str:
    """'scalable' when Pillow's built-in font scales (Pillow >= 10.1 with FreeType), else 'bitmap'."""
    try:
        ImageFont.load_default(size=20)
        return "scalable"
    except (TypeError, ImportError, OSError, AttributeError):
        warnings.warn(
            "Pillow's built-in font does not scale here (needs Pillow >= 10.1 with FreeType); "
            "letters are drawn from the small bitmap font, upscaled",
            RuntimeWarning,
            stacklevel=2,
        )
        return "bitmap"


@lru_cache(maxsize=64)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _glyph(char: str, height: float, outline: float) -> Image.Image:
    """A glyph as a hi-res 'L' image whose ink is ``height`` px tall at output scale.

    ``outline`` > 0 draws a hollow letter: only a band of that width (px) round the glyph.
    """
    S = SUPERSAMPLE
    if _font_backend() == "scalable":
        ref = _font(100).getbbox(char, anchor="mm")
        size = max(4, int(round(100 * height * S / max(1, ref[3] - ref[1]))))
        font = _font(size)
        stroke = int(round(outline * S))
        left, top, right, bottom = font.getbbox(char, anchor="mm", stroke_width=stroke)
        pad = 4 * S
        img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        draw = ImageDraw.Draw(img)
        origin = (pad - left, pad - top)
        if stroke > 0:
            draw.text(origin, char, font=font, anchor="mm", fill=0, stroke_width=stroke, stroke_fill=255)
            draw.text(origin, char, font=font, anchor="mm", fill=0)  # hollow out the inside
        else:
            draw.text(origin, char, font=font, anchor="mm", fill=255)
        return img
    # Fallback: the ~11 px bitmap font, upscaled, blurred and re-thresholded (solid, blobby but usable).
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(char)
    small = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(small).text((2 - left, 2 - top), char, font=font, fill=255)
    scale = height * S / max(1, bottom - top)
    big = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))), Image.NEAREST)
    big = big.filter(ImageFilter.GaussianBlur(0.5 * scale))  # round off the blocky pixels
    return big.point(lambda v: 255 if v >= 100 else 0)


# --------------------------------------------------------------------------- geometry helpers


def _rot(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _circle(radius_x: float, radius_y: float | None = None, n: int = 96, center=(0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    ry = radius_x if radius_y is None else radius_y
    return np.stack((center[0] + radius_x * np.cos(t), center[1] + ry * np.sin(t)), axis=1)


class _Sketch:
    """A hi-res binary drawing, in output-pixel units relative to its (jittered) centre."""

    def __init__(self, rng: np.random.Generator, extent: float) -> None:
        side = (int(math.ceil(extent)) + 6) * SUPERSAMPLE
        self.img = Image.new("L", (side, side), 0)
        self.draw = ImageDraw.Draw(self.img)
        jitter = rng.uniform(-0.5, 0.5, size=2) * SUPERSAMPLE
        self.center = np.array([side / 2, side / 2]) + jitter

    def poly(self, points: np.ndarray, fill: int = 255) -> None:
        xy = self.center + np.asarray(points, dtype=np.float64) * SUPERSAMPLE
        self.draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)

    def circle(self, cx: float, cy: float, r: float, fill: int = 255) -> None:
        self.poly(_circle(r, n=max(24, int(4 * r)), center=(cx, cy)), fill)


def _coverage(img: Image.Image) -> np.ndarray:
    """Downsample a hi-res binary image to area coverage in [0, 1], cropped to its ink."""
    S = SUPERSAMPLE
    a = np.asarray(img, dtype=np.uint8)
    h, w = a.shape[0] // S * S, a.shape[1] // S * S
    a = a[:h, :w]
    cov = (a > 127).reshape(h // S, S, w // S, S).sum(axis=(1, 3), dtype=np.int32).astype(np.float32) / (S * S)
    rows, cols = np.nonzero(cov >= 0.5)
    if rows.size == 0:
        return np.zeros((0, 0), np.float32)
    return cov[max(0, rows.min() - 1) : rows.max() + 2, max(0, cols.min() - 1) : cols.max() + 2]


# --------------------------------------------------------------------------- shapes
# Each draws one instance of diameter about ``d`` px and returns its coverage map.


def _star(rng: np.random.Generator, d: float) -> np.ndarray:
    """A round core with many thin spikes (2-6 px wide) of uneven length."""
    r = d / 2
    sk = _Sketch(rng, d)
    core = r * rng.uniform(0.28, 0.45)
    base_w = rng.uniform(3.0, 6.0)
    max_n = max(5, int(2 * math.pi * r * 0.55 / (base_w + 3.0)))
    n = int(rng.integers(min(7, max_n), min(18, max_n) + 1))
    sk.poly(_circle(core))
    phase = rng.uniform(0, 2 * math.pi)
    for k in range(n):
        a = phase + 2 * math.pi * (k + rng.uniform(-0.2, 0.2)) / n
        length = r * rng.uniform(0.7, 1.0)
        wb, wt = base_w * rng.uniform(0.8, 1.1), rng.uniform(1.6, 3.0)
        u, p = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        sk.poly(
            np.stack(
                [
                    core * 0.7 * u + wb / 2 * p,
                    length * u + wt / 2 * p,
                    length * u - wt / 2 * p,
                    core * 0.7 * u - wb / 2 * p,
                ]
            )
        )
    return _coverage(sk.img)


def _gear(rng: np.random.Generator, d: float) -> np.ndarray:
    """A toothed wheel (teeth 3.5-8 px tall, pitch 8-16 px) with an axle hole and maybe lightening holes."""
    r = d / 2
    sk = _Sketch(rng, d)
    h = min(rng.uniform(3.5, 8.0), r * 0.25)
    rb = r - h
    n = max(8, int(round(2 * math.pi * rb / rng.uniform(8.0, 16.0))))
    step = 2 * math.pi / n
    duty = rng.uniform(0.35, 0.6)
    taper = step * duty * rng.uniform(0.0, 0.2)
    phase = rng.uniform(0, step)
    pts = []
    for k in range(n):
        a0 = phase + k * step
        a1 = a0 + duty * step
        for rad, ang in ((rb, a0), (r, a0 + taper), (r, a1 - taper), (rb, a1)):
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
        for ang in np.linspace(a1, a0 + step, 4)[1:-1]:
            pts.append((rb * math.cos(ang), rb * math.sin(ang)))
    sk.poly(np.array(pts))
    hole = max(3.0, rb * rng.uniform(0.15, 0.4))
    sk.circle(0, 0, hole, fill=0)
    if rng.random() < 0.6:
        m = int(rng.integers(3, 7))
        mid = (hole + 0.85 * rb) / 2
        hr = min(rng.uniform(3.0, 8.0), (0.85 * rb - hole) / 2 - 1.5, math.pi * mid / m - 2.5)
        if hr >= 2.5:
            a0 = rng.uniform(0, 2 * math.pi)
            for k in range(m):
                a = a0 + 2 * math.pi * k / m
                sk.circle(mid * math.cos(a), mid * math.sin(a), hr, fill=0)
    return _coverage(sk.img)


def _ring(rng: np.random.Generator, d: float) -> np.ndarray:
    """A thin (3-8 px) elliptical annulus, half of them broken by a gap."""
    a = d / 2
    b = a * rng.uniform(0.55, 1.0)
    t = min(rng.uniform(3.0, 8.0), 0.4 * b)
    angle = rng.uniform(0, math.pi)
    sk = _Sketch(rng, d)
    n = max(64, int(2 * a))
    sk.poly(_rot(_circle(a, b, n), angle))
    sk.poly(_rot(_circle(a - t, b - t, n), angle), fill=0)
    if rng.random() < 0.5:
        g0 = rng.uniform(0, 2 * math.pi)
        g1 = g0 + rng.uniform(0.25, 1.0)
        arc = np.linspace(g0, g1, 8)
        wedge = np.concatenate([[[0.0, 0.0]], np.stack((1.5 * a * np.cos(arc), 1.5 * a * np.sin(arc)), 1)])
        sk.poly(wedge, fill=0)
    return _coverage(sk.img)


def _letter(rng: np.random.Generator, d: float) -> np.ndarray:
    """A glyph of Pillow's built-in font, tilted; solid when small, often hollow (outlined) when large."""
    char = _LETTERS[int(rng.integers(len(_LETTERS)))]
    hollow = d > 70 and rng.random() < 0.5
    outline = rng.uniform(2.0, 4.0) if hollow else 0.0
    glyph = _glyph(char, d * (0.85 if hollow else 0.8), outline)
    glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR, expand=True)
    return _coverage(glyph)


def _comb(rng: np.random.Generator, d: float) -> np.ndarray:
    """A bar with thin parallel teeth (2-5 px wide, 3-7 px apart) on one side, sometimes both."""
    length = d * rng.uniform(0.75, 0.9)
    spine = rng.uniform(4.0, 9.0)
    w, gap = rng.uniform(2.0, 5.0), rng.uniform(3.0, 7.0)
    tooth = d * rng.uniform(0.25, 0.45)
    both = rng.random() < 0.3
    n = int((length - w) // (w + gap)) + 1
    x0 = -length / 2 + (length - (n * w + (n - 1) * gap)) / 2
    shift = 0.0 if both else -tooth / 2
    rects = [(-length / 2, -spine / 2, length / 2, spine / 2)]
    for k in range(n):
        xa = x0 + k * (w + gap)
        rects.append((xa, spine / 2 - 1, xa + w, spine / 2 + tooth))
        if both:
            rects.append((xa, -spine / 2 - tooth, xa + w, -spine / 2 + 1))
    angle = rng.uniform(0, 2 * math.pi)
    sk = _Sketch(rng, d * 1.15)
    for xa, ya, xb, yb in rects:
        sk.poly(_rot(np.array([[xa, ya + shift], [xb, ya + shift], [xb, yb + shift], [xa, yb + shift]]), angle))
    return _coverage(sk.img)


def _leaf(rng: np.random.Generator, d: float) -> np.ndarray:
    """A pointed leaf with a saw-toothed edge (teeth 2.5-6 px deep, 5-11 px apart) and a thin stalk."""
    half_len = d / 2 * 0.88
    half_w = half_len * rng.uniform(0.3, 0.55)
    t = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    x = half_len * np.cos(t)
    y = half_w * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 1.2 * (1 + 0.25 * np.cos(t))
    pts = np.stack((x, y), 1)
    seg = np.diff(np.concatenate([pts, pts[:1]]), axis=0)
    s = np.concatenate([[0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))[:-1]])
    tangent = np.roll(pts, -1, 0) - np.roll(pts, 1, 0)
    normal = np.stack((tangent[:, 1], -tangent[:, 0]), 1)
    normal /= np.maximum(np.hypot(normal[:, 0], normal[:, 1]), 1e-9)[:, None]
    if np.mean(np.sum(normal * pts, 1)) < 0:
        normal = -normal
    depth, pitch = rng.uniform(2.5, 6.0), rng.uniform(5.0, 11.0)
    saw = depth * ((s / pitch) % 1.0)
    saw *= np.clip(np.abs(np.cos(t)) < 0.97, 0, 1)  # keep the tip and the base smooth
    outline = pts + normal * saw[:, None]
    stalk_w = rng.uniform(2.0, 4.0)
    stalk_len = d * rng.uniform(0.08, 0.12)
    stalk = np.array(
        [
            [half_len - 2, -stalk_w / 2],
            [half_len + stalk_len, -stalk_w / 2],
            [half_len + stalk_len, stalk_w / 2],
            [half_len - 2, stalk_w / 2],
        ]
    )
    angle = rng.uniform(0, 2 * math.pi)
    offset = np.array([-stalk_len / 2, 0.0])
    sk = _Sketch(rng, d * 1.1)
    sk.poly(_rot(outline + offset, angle))
    sk.poly(_rot(stalk + offset, angle))
    return _coverage(sk.img)


def _cheese(rng: np.random.Generator, d: float) -> np.ndarray:
    """A smooth blob with small round holes (2.5-7 px radius) and a few bites out of its edge."""
    r = d / 2
    phi = np.linspace(0, 2 * math.pi, 180, endpoint=False)
    radius = np.full_like(phi, 0.82)
    for k in (2, 3, 4, 5):
        radius += rng.uniform(0, 0.06) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    radius *= r / radius.max()
    aspect = rng.uniform(0.7, 1.0)
    scale = np.array([1.0, aspect])
    angle = rng.uniform(0, 2 * math.pi)
    sk = _Sketch(rng, d)
    sk.poly(_rot(np.stack((radius * np.cos(phi), radius * np.sin(phi)), 1) * scale, angle))
    holes: list[tuple[float, float, float]] = []
    wanted = int(rng.integers(4, 15))
    for _ in range(wanted * 4):  # tries
        if len(holes) >= wanted:
            break
        hr = min(rng.uniform(2.5, 7.0), r * 0.18)
        j = int(rng.integers(len(phi)))
        rho = rng.uniform(0, 1) ** 0.5 * (radius[j] - (hr + 3.0) / aspect)
        if rho <= 0:
            continue
        c = _rot(np.array([[rho * math.cos(phi[j]), rho * math.sin(phi[j])]]) * scale, angle)[0]
        if all(math.hypot(c[0] - hx, c[1] - hy) >= hr + hh + 3.0 for hx, hy, hh in holes):
            holes.append((c[0], c[1], hr))
    for hx, hy, hr in holes:
        sk.circle(hx, hy, hr, fill=0)
    for _ in range(int(rng.integers(0, 4))):
        j = int(rng.integers(len(phi)))
        c = _rot(np.array([[radius[j] * math.cos(phi[j]), radius[j] * math.sin(phi[j])]]) * scale, angle)[0]
        sk.circle(c[0], c[1], rng.uniform(3.0, 7.0), fill=0)
    return _coverage(sk.img)


_RENDERERS = {
    "star": _star,
    "gear": _gear,
    "ring": _ring,
    "letter": _letter,
    "comb": _comb,
    "leaf": _leaf,
    "cheese": _cheese,
}


def render_shape(name: str, rng: np.random.Generator, diameter: float) -> np.ndarray:
    """Coverage map (float32 in [0, 1], cropped to the shape) of one shape; mask = coverage >= 0.5."""
    return _RENDERERS[name](rng, float(diameter))


# --------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a small random grid, bicubically upsampled."""
    gh = max(2, int(round(cells * h / max(h, w))) + 1)
    gw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear gradient in a random direction, in [-1, 1]."""
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    v = xx * math.cos(a) + yy * math.sin(a)
    span = float(v.max() - v.min()) or 1.0
    return (2 * (v - v.min()) / span - 1).astype(np.float32)


def _stripes(rng: np.random.Generator, h: int, w: int, period: float) -> np.ndarray:
    a = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform(0, 2 * math.pi))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Muted textured background (float32 h x w x 3) with low-contrast clutter that is no instance."""
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.75))
    img = np.broadcast_to(base, (h, w, 3)).copy()
    for c in range(3):
        img[..., c] += 0.06 * _smooth_noise(rng, h, w, int(rng.integers(4, 12)))
    img += (0.12 * _ramp(rng, h, w))[..., None]
    if rng.random() < 0.5:
        img += (rng.uniform(0.02, 0.06) * _stripes(rng, h, w, rng.uniform(5.0, 30.0)))[..., None]
    # Clutter: ellipses, polygons and thin lines, a little lighter or darker than the background.
    side = min(h, w)
    for _ in range(int(rng.integers(3, 12))):
        layer = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(layer)
        kind = rng.integers(3)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = side * rng.uniform(0.03, 0.35)
        if kind == 0:
            rx, ry = size, size * rng.uniform(0.3, 1.0)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        elif kind == 1:
            k = int(rng.integers(3, 7))
            pts = np.stack((cx + size * rng.uniform(-1, 1, k), cy + size * rng.uniform(-1, 1, k)), 1)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
        else:
            a = rng.uniform(0, math.pi)
            draw.line(
                [
                    cx - size * 2 * math.cos(a),
                    cy - size * 2 * math.sin(a),
                    cx + size * 2 * math.cos(a),
                    cy + size * 2 * math.sin(a),
                ],
                fill=255,
                width=int(rng.integers(1, 5)),
            )
        alpha = (np.asarray(layer, dtype=np.float32) / 255.0)[..., None] * rng.uniform(0.5, 1.0)
        colour = img.mean(axis=(0, 1)) + rng.normal(0, 0.05, 3).astype(np.float32)
        img = img * (1 - alpha) + colour * alpha
    return img


def _fill(rng: np.random.Generator, category_index: int, h: int, w: int) -> np.ndarray:
    """An instance's paint (float32 h x w x 3): category-correlated colour with a noisy texture."""
    hue = _CATEGORY_HUES[category_index] + rng.normal(0, _HUE_SIGMA)
    colour = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.5, 0.95))
    shade = 1 + 0.12 * _smooth_noise(rng, h, w, int(rng.integers(2, 6)))
    kind = rng.integers(3)
    if kind == 1:
        shade += rng.uniform(0.05, 0.2) * _ramp(rng, h, w)
    elif kind == 2:
        shade += rng.uniform(0.04, 0.1) * _stripes(rng, h, w, rng.uniform(4.0, 16.0))
    return colour * shade[..., None]


# --------------------------------------------------------------------------- images


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _diameter_range(name: str, cfg: ShapesConfig) -> tuple[float, float]:
    s = min(cfg.width, cfg.height) / 384
    lo, hi = _DIAMETERS[name]
    hi = max(24.0, min(hi * s, 0.8 * min(cfg.width, cfg.height)))
    lo = min(max(24.0, lo * s), 0.7 * hi)
    return lo, hi


def render_image(cfg: ShapesConfig, index: int) -> tuple[np.ndarray, list[Instance]]:
    """Image ``index`` of the data set: (uint8 height x width x 3 RGB, its instances in paint order)."""
    rng = _image_rng(cfg.seed, index)
    H, W = cfg.height, cfg.width
    image = _background(rng, H, W)
    names = [c["name"] for c in CATEGORIES]
    target = int(rng.integers(cfg.min_instances, cfg.max_instances + 1))
    placed: list[dict] = []  # category index, visible mask (H x W bool), area, centre, radius
    attempts = 0
    while len(placed) < target and attempts < 12 * target:
        attempts += 1
        cat = int(rng.integers(len(names)))
        lo, hi = _diameter_range(names[cat], cfg)
        diameter = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        cov = render_shape(names[cat], rng, diameter)
        mask = cov >= 0.5
        h, w = mask.shape
        area = int(mask.sum())
        if area < cfg.min_area or h > H or w > W:
            continue
        if placed and rng.random() < 0.45:  # next to (touching / overlapping) an earlier one
            other = placed[int(rng.integers(len(placed)))]
            a = rng.uniform(0, 2 * math.pi)
            dist = (other["radius"] + max(h, w) / 2) * rng.uniform(0.45, 0.95)
            cx, cy = other["center"][0] + dist * math.cos(a), other["center"][1] + dist * math.sin(a)
            x0 = int(np.clip(round(cx - w / 2), 0, W - w))
            y0 = int(np.clip(round(cy - h / 2), 0, H - h))
        else:
            x0 = int(rng.integers(0, W - w + 1))
            y0 = int(rng.integers(0, H - h + 1))
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        hidden = [int(np.count_nonzero(p["mask"][box] & mask)) for p in placed]
        if any(
            p["area"] - k < max(cfg.min_area, cfg.min_visible_fraction * p["full_area"]) for p, k in zip(placed, hidden)
        ):
            continue
        for p, k in zip(placed, hidden):
            if k:
                p["mask"][box] &= ~mask
                p["area"] -= k
        alpha = cov[..., None]
        image[box] = image[box] * (1 - alpha) + _fill(rng, cat, h, w) * alpha
        full = np.zeros((H, W), dtype=bool)
        full[box] = mask
        placed.append(
            {
                "cat": cat,
                "mask": full,
                "area": area,
                "full_area": area,
                "center": (x0 + w / 2, y0 + h / 2),
                "radius": max(h, w) / 2,
            }
        )
    image += rng.normal(0, 0.012, size=image.shape).astype(np.float32)
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return pixels, [Instance(CATEGORIES[p["cat"]]["id"], p["mask"]) for p in placed]


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
        "area": int(np.count_nonzero(mask)),
        "bbox": [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1],
        "iscrowd": 0,
    }


def _write_image(cfg: ShapesConfig, out: Path, index: int) -> list[dict]:
    """Renders and saves image ``index``; -> its annotations (ids filled in by the caller)."""
    pixels, instances = render_image(cfg, index)
    Image.fromarray(pixels).save(out / "images" / f"{index:06d}.png", format="PNG", compress_level=6)
    return [_annotation(inst.mask, 0, index + 1, inst.category_id) for inst in instances]


def write_shapes(cfg: ShapesConfig, out_dir: str | os.PathLike, workers: int = 1) -> Path:
    """Write the data set described by ``cfg`` to ``out_dir``; returns the annotations path.

    ``workers`` processes render in parallel; each image depends only on ``(seed, index)``, so
    the files are the same for any number of workers."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    out = Path(out_dir)
    if (out / "annotations.json").exists():
        # Rewriting it would leave the earlier set's extra images behind, unannotated.
        raise ValueError(f"{out} holds a data set already (annotations.json): give a new or empty folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    indices = range(cfg.num_images)
    write = partial(_write_image, cfg, out)
    progress = dict(total=cfg.num_images, desc="make-shapes", unit="img", disable=None)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_image = list(tqdm(pool.map(write, indices, chunksize=8), **progress))
    else:
        per_image = list(tqdm(map(write, indices), **progress))
    images = [
        {"id": index + 1, "file_name": f"{index:06d}.png", "width": cfg.width, "height": cfg.height}
        for index in indices
    ]
    annotations = [annotation for image in per_image for annotation in image]
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    info = {
        "description": "transfiner synthetic fine-detail shapes (make-shapes)",
        "generator": "model.shapes",
        "version": GENERATOR_VERSION,
        "font": _font_backend(),
        **asdict(cfg),
    }
    data = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    path = out / "annotations.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)
    return path


def make_shapes(
    out_dir: str | os.PathLike, num_images: int, seed: int, size: tuple[int, int] = (384, 384), workers: int = 1
) -> Path:
    """Write ``num_images`` images of ``size`` = (width, height) to ``out_dir``; returns annotations.json's path."""
    width, height = size
    return write_shapes(ShapesConfig(num_images=num_images, seed=seed, width=width, height=height), out_dir, workers)


def parse_size(text: str | None) -> tuple[int, int]:
    """'WxH' -> (W, H); both sides 64..4096. None means the default 384x384."""
    if text is None:
        return (384, 384)
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"--size must look like WIDTHxHEIGHT, e.g. 384x384, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"--size sides must be from {MIN_SIDE} to {MAX_SIDE} pixels, got {width}x{height}")
    return width, height
