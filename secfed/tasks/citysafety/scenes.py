"""Procedural city-safety camera frames.

Each hazard class has a visual cue (flames and smoke, a water line, cracks and debris, a figure
at a fence, sparks on a cabinet, many people) drawn into a cluttered street/site scene with
neutral distractors that also occur in other classes (fences, cabinets, a few people, puddles),
random lighting, day/night, per-enterprise tint and sensor noise -- visible, not trivial.
Randomness comes from a caller-supplied numpy ``Generator`` (data only, never secrets).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from secfed.tasks.citysafety.taxonomy import HAZARD_CLASSES

#: Stored frame size (pixels, square). Small so a CPU demo trains in minutes.
FRAME_SIZE = 48
_CANVAS = 96  # drawn at 2x and box-downsampled, for cheap anti-aliasing


def _colour(rng: np.random.Generator, base: tuple[int, int, int], spread: int = 25) -> tuple:
    jitter = rng.integers(-spread, spread + 1, size=3)
    return tuple(int(np.clip(b + j, 0, 255)) for b, j in zip(base, jitter))


def _background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, night: bool) -> int:
    horizon = int(rng.integers(_CANVAS * 0.3, _CANVAS * 0.6))
    sky = (25, 30, 55) if night else (135, 175, 215)
    ground = (40, 40, 40) if night else tuple(int(c) for c in rng.choice(
        [(110, 110, 105), (95, 120, 80), (130, 115, 90)]))
    for y in range(horizon):
        shade = y / max(horizon, 1)
        c = tuple(int(s * (0.8 + 0.3 * shade)) for s in sky)
        draw.line([(0, y), (_CANVAS, y)], fill=_colour(rng, c, 4))
    draw.rectangle([0, horizon, _CANVAS, _CANVAS], fill=_colour(rng, ground, 12))
    # Skyline blocks: neutral clutter present in every class.
    for _ in range(int(rng.integers(1, 4))):
        w = int(rng.integers(10, 26))
        h = int(rng.integers(10, horizon + 1))
        x = int(rng.integers(0, _CANVAS - w))
        shade = (60, 60, 70) if night else (150, 150, 150)
        draw.rectangle([x, horizon - h, x + w, horizon], fill=_colour(rng, shade, 20))
    return horizon


def _person(draw, x: int, y: int, scale: float, colour) -> None:
    r = max(2, int(3 * scale))
    draw.ellipse([x - r, y - 3 * r, x + r, y - r], fill=colour)
    draw.rectangle([x - r, y - r, x + r, y + 3 * r], fill=colour)


def _fence(draw, rng, horizon: int, night: bool) -> None:
    top = horizon + int(rng.integers(-10, 6))
    bottom = top + int(rng.integers(18, 30))
    colour = (90, 90, 90) if night else (70, 70, 60)
    step = int(rng.integers(5, 9))
    for x in range(int(rng.integers(0, step)), _CANVAS, step):
        draw.line([(x, top), (x, bottom)], fill=colour, width=1)
    draw.line([(0, top + 2), (_CANVAS, top + 2)], fill=colour, width=2)


def _cabinet(draw, rng, horizon: int) -> tuple[int, int, int, int]:
    w, h = int(rng.integers(14, 26)), int(rng.integers(16, 30))
    x = int(rng.integers(4, _CANVAS - w - 4))
    y = int(np.clip(horizon + rng.integers(-8, 16), 4, _CANVAS - h - 2))
    draw.rectangle([x, y, x + w, y + h], fill=_colour(rng, (120, 125, 130), 15),
                   outline=(50, 50, 55))
    return x, y, w, h


def _puddle(draw, rng, horizon: int) -> None:
    x = int(rng.integers(0, _CANVAS - 20))
    y = int(rng.integers(horizon + 5, _CANVAS - 4))
    draw.ellipse([x, y, x + int(rng.integers(8, 20)), y + 4], fill=_colour(rng, (70, 100, 150), 15))


def _distractors(draw, rng, horizon: int, night: bool, cls: str) -> None:
    """Neutral objects drawn in any class: they overlap the cues of other classes."""
    if rng.random() < 0.35 and cls != "intrusion":
        _fence(draw, rng, horizon, night)
    if rng.random() < 0.3 and cls != "equipment_fault":
        _cabinet(draw, rng, horizon)
    if rng.random() < 0.3 and cls != "flooding":
        _puddle(draw, rng, horizon)
    if rng.random() < 0.4 and cls not in ("crowding", "intrusion"):
        for _ in range(int(rng.integers(1, 4))):
            _person(draw, int(rng.integers(4, _CANVAS - 4)),
                    int(rng.integers(horizon + 4, _CANVAS - 10)), 0.8,
                    _colour(rng, (80, 60, 60), 40))


def _fire_smoke(draw, rng, horizon, night) -> None:
    smoke_only = rng.random() < 0.3
    cx = int(rng.integers(15, _CANVAS - 15))
    base = int(rng.integers(horizon, _CANVAS - 5))
    for _ in range(int(rng.integers(3, 7))):  # smoke plume drifting up
        r = int(rng.integers(6, 14))
        x = cx + int(rng.integers(-12, 13))
        y = base - int(rng.integers(15, 60))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rng, (105, 105, 110), 20))
    if not smoke_only:
        for _ in range(int(rng.integers(2, 5))):
            w = int(rng.integers(5, 12))
            h = int(rng.integers(10, 26))
            x = cx + int(rng.integers(-12, 13))
            colour = _colour(rng, (235, int(rng.integers(80, 190)), 30), 20)
            draw.polygon([(x - w, base), (x + w, base), (x + int(rng.integers(-3, 4)), base - h)],
                         fill=colour)


def _flooding(draw, rng, horizon, night) -> None:
    level = int(rng.integers(horizon + 2, int(_CANVAS * 0.8)))
    water = (40, 60, 95) if night else _colour(rng, (70, 95, 140) if rng.random() < 0.6
                                               else (120, 105, 70), 15)
    draw.rectangle([0, level, _CANVAS, _CANVAS], fill=water)
    for y in range(level + 3, _CANVAS, int(rng.integers(4, 8))):  # ripples
        x0 = int(rng.integers(0, 20))
        for x in range(x0, _CANVAS, 14):
            draw.line([(x, y), (x + 6, y - 1)], fill=_colour(rng, (170, 190, 210), 20))
    if rng.random() < 0.6:  # a half-submerged car or box
        x = int(rng.integers(5, _CANVAS - 25))
        draw.rectangle([x, level - 6, x + 20, level + 2], fill=_colour(rng, (150, 40, 40), 60))


def _structural_damage(draw, rng, horizon, night) -> None:
    w, h = int(rng.integers(28, 50)), int(rng.integers(30, 60))
    x = int(rng.integers(2, _CANVAS - w - 2))
    top = max(2, horizon + 10 - h)
    lean = int(rng.integers(-8, 9))
    wall = _colour(rng, (150, 125, 100), 25)
    draw.polygon([(x + lean, top), (x + w + lean, top), (x + w, horizon + 10), (x, horizon + 10)],
                 fill=wall)
    for _ in range(int(rng.integers(1, 4))):  # jagged cracks
        px, py = x + int(rng.integers(3, w - 3)), top + int(rng.integers(2, 10))
        pts = [(px, py)]
        for _ in range(int(rng.integers(3, 7))):
            px += int(rng.integers(-5, 6))
            py += int(rng.integers(3, 9))
            pts.append((px, py))
        draw.line(pts, fill=(25, 20, 20), width=2)
    for _ in range(int(rng.integers(4, 12))):  # debris
        dx = x + int(rng.integers(-8, w + 8))
        dy = horizon + int(rng.integers(8, 20))
        s = int(rng.integers(2, 5))
        draw.rectangle([dx, dy, dx + s, dy + s], fill=_colour(rng, (120, 100, 80), 30))


def _intrusion(draw, rng, horizon, night) -> None:
    _fence(draw, rng, horizon, night)
    x = int(rng.integers(10, _CANVAS - 10))
    y = horizon + int(rng.integers(0, 12))
    colour = (20, 20, 25) if not night else (170, 170, 160)
    _person(draw, x, y, 1.2, _colour(rng, colour, 15))
    if rng.random() < 0.5:  # torch beam
        draw.polygon([(x + 3, y), (x + 30, y - 8), (x + 30, y + 8)], fill=(200, 200, 150))


def _equipment_fault(draw, rng, horizon, night) -> None:
    x, y, w, h = _cabinet(draw, rng, horizon)
    for _ in range(int(rng.integers(1, 4))):  # sparks / arcs
        px, py = x + int(rng.integers(0, w)), y + int(rng.integers(0, h // 2 + 1))
        pts = [(px, py)]
        for _ in range(int(rng.integers(3, 6))):
            px += int(rng.integers(-7, 8))
            py -= int(rng.integers(2, 7))
            pts.append((px, py))
        draw.line(pts, fill=_colour(rng, (250, 240, 120), 10), width=2)
    if rng.random() < 0.6:  # warning lamp
        draw.ellipse([x + 2, y + 2, x + 7, y + 7], fill=(230, 30, 30))


def _crowding(draw, rng, horizon, night) -> None:
    for _ in range(int(rng.integers(14, 36))):
        _person(draw, int(rng.integers(2, _CANVAS - 2)),
                int(rng.integers(horizon, _CANVAS - 8)), float(rng.uniform(0.6, 1.0)),
                _colour(rng, tuple(int(c) for c in rng.integers(30, 220, size=3)), 10))


def _normal(draw, rng, horizon, night) -> None:
    # A calm scene: only the shared distractors (drawn by the caller), sometimes a vehicle.
    if rng.random() < 0.5:
        x = int(rng.integers(5, _CANVAS - 30))
        y = int(rng.integers(horizon + 5, _CANVAS - 12))
        draw.rectangle([x, y, x + 24, y + 9], fill=_colour(rng, (60, 90, 160), 60))


_CUES = {
    "fire_smoke": _fire_smoke,
    "flooding": _flooding,
    "structural_damage": _structural_damage,
    "intrusion": _intrusion,
    "equipment_fault": _equipment_fault,
    "crowding": _crowding,
    "normal": _normal,
}


def render_scene(
    label: str,
    rng: np.random.Generator,
    *,
    night_fraction: float = 0.2,
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Render one ``FRAME_SIZE`` x ``FRAME_SIZE`` RGB frame (uint8 ``[H, W, 3]``) of ``label``.

    Raises:
        KeyError: ``label`` is not in :data:`HAZARD_CLASSES`.
    """
    if label not in HAZARD_CLASSES:
        raise KeyError(label)
    night = bool(rng.random() < night_fraction)
    canvas = Image.new("RGB", (_CANVAS, _CANVAS))
    draw = ImageDraw.Draw(canvas)
    horizon = _background(draw, rng, night)
    # Distractors behind or in front of the cue, at random.
    front = rng.random() < 0.5
    if not front:
        _distractors(draw, rng, horizon, night, label)
    _CUES[label](draw, rng, horizon, night)
    if front:
        _distractors(draw, rng, horizon, night, label)
    if rng.random() < 0.25:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0))))
    frame = canvas.resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(frame, dtype=np.float32)
    gain = rng.uniform(0.7, 1.25) * np.asarray(tint, dtype=np.float32)
    pixels = pixels * gain + rng.uniform(-20, 20)
    if night:
        grey = pixels.mean(axis=2, keepdims=True)  # IR cameras: desaturated
        pixels = 0.3 * pixels + 0.7 * grey
    pixels = pixels + rng.normal(0.0, rng.uniform(4, 14), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def perturb_frame(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate of ``frame``: re-encoded with a little noise and brightness change."""
    pixels = frame.astype(np.float32) * rng.uniform(0.94, 1.06) + rng.normal(0, 3, frame.shape)
    if rng.random() < 0.5:
        pixels = np.roll(pixels, int(rng.integers(-1, 2)), axis=1)
    return np.clip(pixels, 0, 255).astype(np.uint8)
