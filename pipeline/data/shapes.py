"""The embedded "shapes" world: a procedural segmentation set with exact masks (docs/design.md §5).

Each image is a textured background (one of `SHAPES_BACKGROUND` in `pipeline/model/text.py`: sky, grass, water,
sand, bricks, road) with 1–3 objects of the six `SHAPES_CLASSES` (ball, star, box, triangle, ring, heart).
A class is a shape *and* a colour/texture; colours are jittered per object, sizes, rotations and positions
vary, and later objects may occlude earlier ones (each object keeps at least `MIN_VISIBLE` of its area).
Masks are exact: objects are rasterised without anti-aliasing, so every pixel of a mask region was painted
with that object's texture (0 = background, class_id + 1 = object; no ignore pixels).

Everything is a pure function of `(seed, index)`: image `index` of a run uses `numpy.random.default_rng([seed,
index])`, so the same seed gives byte-identical files and a longer run starts with the shorter run's images.

`generate(root, split, count, seed, size)` writes the VOC layout the VOC reader accepts; `iter_samples` yields
the same samples in memory (the tiny CLIP of `pipeline/model/toy_clip.py` trains on it without files).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from weclip.pipeline.config import preset
from weclip.pipeline.palette import label_image
from weclip.pipeline.model.text import SHAPES_BACKGROUND, SHAPES_CLASSES, class_set

JPEG_QUALITY = 95
OBJECT_COUNT_PROBS = (0.45, 0.35, 0.20)  # 1, 2 or 3 objects
RADIUS_RANGE = (0.09, 0.24)  # object circumradius as a fraction of the image side (20–54 px at 224)
MIN_VISIBLE = 0.45  # an object must keep this fraction of its pixels after occlusion, else it is re-placed
MAX_PLACEMENT_TRIES = 30
STAR_INNER = 0.45  # star: inner / outer radius
RING_INNER = 0.55  # ring: hole radius / outer radius

# Object appearance per class id (order of SHAPES_CLASSES): base RGB colour and fill texture.
_OBJECT_COLOURS = (
    (215, 35, 35),  # ball: red, radial shading
    (245, 210, 30),  # star: yellow
    (135, 55, 205),  # box: purple, diagonal stripes
    (250, 125, 20),  # triangle: orange
    (245, 245, 245),  # ring: white
    (235, 70, 175),  # heart: pink
)
COLOUR_JITTER = 18  # per-channel uniform jitter of an object's colour
TEXTURE_AMPLITUDE = 0.08  # fill textures multiply the colour by 1 ± this (mean 1), see _object_fill


@dataclass(frozen=True)
class ShapeObject:
    """One placed object: class id, centre and circumradius in pixels, rotation (radians), RGB colour."""
    class_id: int
    cx: float
    cy: float
    radius: float
    angle: float
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class ShapeSample:
    """One generated image. `labels` are the sorted 0-based class ids visible in `mask`."""
    image: np.ndarray  # H×W×3 uint8
    mask: np.ndarray  # H×W uint8, 0 = background, class_id + 1 = object
    labels: tuple[int, ...]
    background: int  # index into SHAPES_BACKGROUND
    objects: tuple[ShapeObject, ...]  # in drawing order (later ones are on top)
    caption: str


def describe(labels: tuple[int, ...] | list[int], background: int | None) -> str:
    """The phrase naming the given objects (in the given order) and optionally the background.

    Uses the shapes class set's prompt names, so `template.format(describe((c,), None))` is exactly the class
    prompt the CAM uses (docs/algorithm.md §3.3): e.g. "a ball and a star on grass".
    """
    names = class_set("shapes")
    objects = [names.prompt_names[c] for c in labels]
    if len(objects) > 1:
        phrase = ", ".join(objects[:-1]) + " and " + objects[-1]
    else:
        phrase = objects[0] if objects else ""
    if background is None:
        return phrase
    where = names.background[background]
    return f"{phrase} on {where}" if phrase else where


def caption(labels: tuple[int, ...] | list[int], background: int, template: str) -> str:
    """The stored caption of an image: every visible class (ascending id) and the background."""
    return template.format(describe(tuple(labels), background))


# ----------------------------------------------------------------------------------------------------------
# Rendering helpers (numpy in, numpy out)


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array([r, g, b], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """size×size float32 noise in [0, 1], bilinearly upsampled from a cells×cells random grid."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), mode="L")
    return np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32) / np.float32(255)


def _grain(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """size×size×1 float32 white noise, uniform in ±amplitude/2."""
    return ((rng.random((size, size), dtype=np.float32) - np.float32(0.5)) * np.float32(amplitude))[..., None]


@functools.lru_cache(maxsize=4)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each size×size float32 (cached: callers must not modify them)."""
    ax = np.arange(size, dtype=np.float32) + np.float32(0.5)
    return tuple(np.meshgrid(ax, ax, indexing="ij"))


def _background(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """size×size×3 float32 RGB background texture of the given SHAPES_BACKGROUND index."""
    y, x = _coords(size)
    name = SHAPES_BACKGROUND[kind]
    if name == "sky":  # vertical gradient with soft white clouds
        t = (y / np.float32(size))[..., None]
        img = _rgb(70, 135, 225) * (1 - t) + _rgb(165, 205, 245) * t
        clouds = np.clip((_smooth_noise(rng, size, 5) - np.float32(0.55)) * 3, 0, 1)[..., None]
        return img * (1 - clouds) + _rgb(250, 250, 252) * clouds + _grain(rng, size, 6)
    if name == "grass":  # mottled green with darker vertical blades
        base = _rgb(60, 135, 45) * (np.float32(0.8) + np.float32(0.4) * _smooth_noise(rng, size, 8))[..., None]
        blades = (rng.random((size // 3 + 1, size), dtype=np.float32) < 0.25).repeat(3, axis=0)[:size]
        return base * (1 - np.float32(0.25) * blades[..., None]) + _grain(rng, size, 30)
    if name == "water":  # wavy horizontal stripes
        phase, freq = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.3)
        waves = np.sin(y * np.float32(freq) + 3 * np.sin(x * np.float32(0.05) + np.float32(phase)))[..., None]
        return _rgb(30, 95, 150) + waves * _rgb(20, 30, 30) + _grain(rng, size, 10)
    if name == "sand":  # beige grain with distorted ripples
        ripples = np.sin((x + _smooth_noise(rng, size, 4) * np.float32(size)) * np.float32(0.5))[..., None]
        return _rgb(212, 186, 132) + ripples * 10 + _grain(rng, size, 40)
    if name == "bricks":  # running-bond bricks of varying shade, light mortar
        brick_h, brick_w = size // 14, size // 7
        pix = np.arange(size)
        row = pix // brick_h
        shifted = pix[None, :] + (row % 2)[:, None] * (brick_w // 2)
        shade = rng.uniform(0.8, 1.15, size=(row[-1] + 1, size // brick_w + 2)).astype(np.float32)
        img = _rgb(150, 70, 50) * shade[row[:, None], shifted // brick_w][..., None] + _grain(rng, size, 20)
        img[((pix % brick_h) < 2)[:, None] | ((shifted % brick_w) < 2)] = _rgb(185, 180, 170)
        return img
    if name == "road":  # grey asphalt with a dashed white lane line
        img = _rgb(88, 88, 92) * (np.float32(0.9) + np.float32(0.2) * _smooth_noise(rng, size, 16))[..., None]
        img = img + _grain(rng, size, 30)
        lane_y = rng.uniform(0.3, 0.7) * size
        img[(np.abs(y - lane_y) < size / 60) & ((x // (size / 8)) % 2 == 0)] = _rgb(230, 230, 225)
        return img
    raise ValueError(f"unknown background index {kind}; expected 0..{len(SHAPES_BACKGROUND) - 1}")


def _polygon(obj: ShapeObject, unit: np.ndarray) -> list[tuple[float, float]]:
    """Rotate, scale and translate unit-circle polygon vertices (N×2, x right, y down) into pixel space."""
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    pts = unit @ np.array([[c, s], [-s, c]]) * obj.radius + np.array([obj.cx, obj.cy])
    return [(float(px), float(py)) for px, py in pts]


def _regular(n: int, start: float = -math.pi / 2) -> np.ndarray:
    t = start + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5) * STAR_INNER
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


_UNIT_POLYGONS = {"star": _star(), "box": _regular(4, math.pi / 4), "triangle": _regular(3), "heart": _heart()}


def _object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Exact (non-anti-aliased) boolean mask of one object."""
    name = SHAPES_CLASSES[obj.class_id]
    if name in ("ball", "ring"):
        y, x = _coords(size)
        r2 = (x - obj.cx) ** 2 + (y - obj.cy) ** 2
        inside = r2 <= obj.radius ** 2
        return inside & (r2 >= (RING_INNER * obj.radius) ** 2) if name == "ring" else inside
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(_polygon(obj, _UNIT_POLYGONS[name]), fill=1)
    return np.asarray(canvas, dtype=bool)


def _object_fill(rng: np.random.Generator, obj: ShapeObject, own: np.ndarray) -> np.ndarray:
    """RGB float32 values (N×3) for the N pixels of `own`: the object's colour × a class texture of mean ≈ 1
    (±TEXTURE_AMPLITUDE)."""
    y, x = (c[own] for c in _coords(own.shape[0]))
    name = SHAPES_CLASSES[obj.class_id]
    a = np.float32(TEXTURE_AMPLITUDE)
    if name == "ball":  # highlight towards the upper left
        d = np.hypot(x - (obj.cx - 0.35 * obj.radius), y - (obj.cy - 0.35 * obj.radius)) / (1.35 * obj.radius)
        factor = 1 + a * (1 - 2 * np.clip(d, 0, 1))
    elif name == "box":  # diagonal stripes
        c, s = math.cos(obj.angle), math.sin(obj.angle)
        factor = 1 + a * np.sign(np.sin(((x - obj.cx) * c + (y - obj.cy) * s) * 0.6))
    else:  # fine grain
        factor = 1 + a * (2 * rng.random(x.shape, dtype=np.float32) - 1)
    return np.asarray(obj.colour, dtype=np.float32) * factor.astype(np.float32)[:, None]


def _place(rng: np.random.Generator, class_id: int, size: int) -> ShapeObject:
    radius = rng.uniform(*RADIUS_RANGE) * size
    margin = 0.6 * radius  # the object may be cut by the border, but most of it stays inside
    cx, cy = rng.uniform(margin, size - margin, size=2)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    colour = tuple(int(v) for v in np.clip(np.array(_OBJECT_COLOURS[class_id]) + jitter, 0, 255))
    return ShapeObject(class_id, float(cx), float(cy), float(radius), float(rng.uniform(0, 2 * math.pi)), colour)


def _all_visible(masks: list[np.ndarray]) -> bool:
    """True when every mask (drawn in list order) keeps at least MIN_VISIBLE of its pixels uncovered."""
    covered = np.zeros_like(masks[0])
    for own in reversed(masks):
        area = own.sum()
        if area == 0 or (own & ~covered).sum() < MIN_VISIBLE * area:
            return False
        covered |= own
    return True


def _layout(rng: np.random.Generator, size: int) -> tuple[list[ShapeObject], list[np.ndarray]]:
    """Place 1–3 objects (an object that cannot be placed visibly enough in MAX_PLACEMENT_TRIES is dropped)."""
    count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)) + 1
    objects: list[ShapeObject] = []
    masks: list[np.ndarray] = []
    for class_id in rng.integers(0, len(SHAPES_CLASSES), size=count):
        for _ in range(MAX_PLACEMENT_TRIES):
            obj = _place(rng, int(class_id), size)
            own = _object_mask(obj, size)
            if _all_visible(masks + [own]):
                objects.append(obj)
                masks.append(own)
                break
    return objects, masks


def render(rng: np.random.Generator, size: int, template: str) -> ShapeSample:
    """Draw one sample from `rng` (background, objects, exact mask, labels, caption)."""
    background = int(rng.integers(0, len(SHAPES_BACKGROUND)))
    img = _background(rng, background, size)
    objects, masks = _layout(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for obj, own in zip(objects, masks):
        img[own] = _object_fill(rng, obj, own)
        mask[own] = obj.class_id + 1
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    labels = tuple(int(v) - 1 for v in np.unique(mask) if v != 0)
    return ShapeSample(image, mask, labels, background, tuple(objects), caption(labels, background, template))


def sample(seed: int, index: int, size: int, template: str) -> ShapeSample:
    """Sample `index` of the world with this seed; independent of every other index."""
    return render(np.random.default_rng([seed, index]), size, template)


def iter_samples(seed: int, size: int, template: str, start: int = 0,
                 count: int | None = None) -> Iterator[ShapeSample]:
    """Samples start, start+1, … (forever when count is None)."""
    index = start
    while count is None or index < start + count:
        yield sample(seed, index, size, template)
        index += 1


def image_id(split: str, index: int) -> str:
    return f"shapes_{split}_{index:05d}"


def generate(root: str | Path, split: str, count: int, seed: int, size: int = 224,
             template: str | None = None) -> list[str]:
    """Write `count` samples in the VOC layout under `root` and return their ids.

    Files: `JPEGImages/<id>.jpg` (quality JPEG_QUALITY, 4:4:4), `SegmentationClass/<id>.png` (mode P, VOC palette),
    `ImageSets/Segmentation/<split>.txt`, and `captions.jsonl` (one JSON object per image: image_id, split, labels,
    background, caption). Entries of other splits already in `captions.jsonl` are kept, so several splits can
    share one root. `template` defaults to the shapes preset's prompt template.
    """
    template = template if template is not None else preset("shapes").text.template
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids, records = [], []
    for index, s in enumerate(iter_samples(seed, size, template, count=count)):
        name = image_id(split, index)
        Image.fromarray(s.image, mode="RGB").save(root / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY,
                                                  subsampling=0)
        label_image(s.mask).save(root / "SegmentationClass" / f"{name}.png")
        ids.append(name)
        records.append({"image_id": name, "split": split, "labels": list(s.labels),
                        "background": SHAPES_BACKGROUND[s.background], "caption": s.caption})
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    _merge_captions(root / "captions.jsonl", split, records)
    return ids


def _merge_captions(path: Path, split: str, records: list[dict]) -> None:
    kept = []
    if path.exists():
        kept = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") != split]
    lines = [json.dumps(r, sort_keys=True) for r in kept + records]
    path.write_text("".join(f"{line}\n" for line in lines))
