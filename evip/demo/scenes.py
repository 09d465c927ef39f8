"""Deterministic synthetic scenes: a few coloured shapes and maybe a short word, with their facts.

A scene is drawn from a seed and a style alone (`render_scene(seed, style=...)`), so the same
seed always gives the same pixels and the same facts. Two styles make the demo's coarse-to-fine
curriculum: `SIMPLE` (S1.1: mostly one large shape in the centre), `CONCEPT` (one large shape in
the centre or two large ones side by side, no words) and `RICH` (S1.2 onwards and the held-out set: up to four smaller shapes in five slots,
maybe a word). Objects sit in distinct named slots (left, right, top, bottom,
centre) so every fact is unambiguous: "the red circle is on the left", "there are 3 shapes",
"the word is 'fish'". Each (colour, shape) pair occurs at most once per scene, so a referring
expression like "red circle" names exactly one object (what grounding needs).
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, replace

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Slot centres as fractions of the image side; shape radius RADIUS * side keeps slots disjoint.
SLOTS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
    "centre": (0.5, 0.5),
}
RADIUS = 0.13
WORD_WIDTH = 0.3            # a word may span this fraction of the side (its slot's room)
WORDS = ("cat", "dog", "sun", "map", "box", "fish", "tree", "milk", "cup", "bus",
         "hat", "key", "pen", "egg", "car", "bird", "moon", "book", "door", "rain")
WORD_COLOUR = (20, 20, 20)
BACKGROUND = (245, 245, 240)
MAX_SHAPES = 4


@dataclass(frozen=True)
class SceneStyle:
    """What a scene may hold: how many shapes, how big (radius as a fraction of the side), where
    (slot name -> centre as fractions of the side; one shape sits in `single_slot`), and how often
    a word is written."""
    name: str
    min_shapes: int
    max_shapes: int
    radius: float
    slots: tuple[tuple[str, tuple[float, float]], ...]
    word_probability: float
    single_slot: str | None = None          # where a lone shape goes (None: any slot)
    single_radius: float | None = None      # a lone shape's radius (None: `radius`)
    single_probability: float | None = None  # chance of a lone shape (None: counts drawn uniformly)
    jitter: float = 0.0                     # each shape moves up to this fraction of the side and
                                            # shrinks up to 10%, so no two pictures are alike


RICH = SceneStyle("rich", 1, MAX_SHAPES, RADIUS, tuple(SLOTS.items()), 0.5)
CONCEPT = SceneStyle("concept", 1, 2, 0.2,
                     (("left", (0.27, 0.5)), ("right", (0.73, 0.5)), ("centre", (0.5, 0.5))),
                     0.0, single_slot="centre", single_radius=0.34,   # a lone shape fills the picture
                     jitter=0.025)
# S1.1's concept pictures: CONCEPT's layouts, three in four of them one shape filling the centre
# (colour and shape first; two side by side, for counts and places, come with the rest)
SIMPLE = replace(CONCEPT, name="simple", single_probability=0.75)
STYLES = {s.name: s for s in (RICH, CONCEPT, SIMPLE)}


@dataclass
class SceneObject:
    shape: str                     # one of SHAPES
    colour: str                    # one of COLOURS
    position: str                  # one of SLOTS
    center: tuple[int, int]        # pixel centre (x, y)
    box: tuple[int, int, int, int]  # pixel box x1, y1, x2, y2 (inclusive-exclusive, like PIL)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class SceneWord:
    text: str
    position: str
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    seed: int
    size: int
    objects: list[SceneObject] = field(default_factory=list)
    word: SceneWord | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (shape is None or o.shape == shape) and (colour is None or o.colour == colour))


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _triangle_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def _box_of(points: list[tuple[float, float]]) -> tuple[int, int, int, int]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rgb: tuple[int, int, int]) -> tuple[int, int, int, int]:
    if shape == "circle":
        box = (math.floor(cx - r), math.floor(cy - r), math.ceil(cx + r), math.ceil(cy + r))
        draw.ellipse(box, fill=rgb)
        return box
    if shape == "square":
        s = r * 0.85
        box = (math.floor(cx - s), math.floor(cy - s), math.ceil(cx + s), math.ceil(cy + s))
        draw.rectangle(box, fill=rgb)
        return box
    if shape == "triangle":
        pts = _triangle_points(cx, cy, r)
    elif shape == "star":
        pts = _star_points(cx, cy, r)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    draw.polygon(pts, fill=rgb)
    return _box_of(pts)


def sample_layout(rng: random.Random, style: SceneStyle = RICH
                  ) -> tuple[list[tuple[str, str, str]], tuple[str, str] | None]:
    """Pick (shape, colour, slot) triples and an optional (word, slot), all slots distinct."""
    if style.single_probability is not None and style.min_shapes == 1 and rng.random() < style.single_probability:
        n_shapes = 1
    else:
        n_shapes = rng.randint(style.min_shapes if style.single_probability is None else 2, style.max_shapes)
    with_word = rng.random() < style.word_probability and n_shapes < len(style.slots)
    names = [name for name, _ in style.slots]
    if n_shapes == 1 and not with_word and style.single_slot is not None:
        slots = [style.single_slot]
    else:
        names = [n for n in names if n != style.single_slot] if style.single_slot else names
        slots = rng.sample(names, n_shapes + int(with_word))
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n_shapes)
    objects = [(s, c, slot) for (s, c), slot in zip(pairs, slots)]
    word = (rng.choice(WORDS), slots[-1]) if with_word else None
    return objects, word


@functools.lru_cache(maxsize=256)
def _fitting_font(text: str, size: int) -> ImageFont.FreeTypeFont:
    """The largest font (at most 0.15 * size) whose rendering of `text` fits its slot's width."""
    px = max(6, round(size * 0.15))
    font = ImageFont.load_default(size=px)
    while px > 6 and font.getlength(text) > WORD_WIDTH * size:
        px -= 1
        font = ImageFont.load_default(size=px)
    return font


def render_scene(seed: int, size: int = 112, style: SceneStyle = RICH) -> tuple[Image.Image, Scene]:
    """Render the scene of `seed` in `style` as an RGB image of `size` x `size`; return it with its facts."""
    if size < 32:
        raise ValueError(f"scene size {size} too small to draw legible shapes and words (min 32)")
    rng = random.Random(seed)
    objects, word = sample_layout(rng, style)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    scene = Scene(seed=seed, size=size)
    centres = dict(style.slots)
    lone = len(objects) == 1 and style.single_radius is not None
    r = (style.single_radius if lone else style.radius) * size
    for shape, colour, slot in objects:
        fx, fy = centres[slot]
        cx, cy, rr = fx * size, fy * size, r
        if style.jitter:            # drawn after the layout: the same seed keeps its objects and slots
            cx += rng.uniform(-style.jitter, style.jitter) * size
            cy += rng.uniform(-style.jitter, style.jitter) * size
            rr = r * rng.uniform(0.9, 1.0)
        box = _draw_shape(draw, shape, cx, cy, rr, COLOURS[colour])
        scene.objects.append(SceneObject(shape, colour, slot, (round(cx), round(cy)), box))
    if word is not None:
        text, slot = word
        font = _fitting_font(text, size)
        fx, fy = centres[slot]
        draw.text((fx * size, fy * size), text, fill=WORD_COLOUR, font=font, anchor="mm")
        box = draw.textbbox((fx * size, fy * size), text, font=font, anchor="mm")
        scene.word = SceneWord(text, slot, tuple(int(v) for v in box))
    return image, scene


def box_to_1000(box: tuple[int, int, int, int], size: int) -> list[int]:
    """A pixel box in InternVL's normalised 0-1000 coordinates (x1, y1, x2, y2), clipped."""
    return [min(1000, max(0, int(round(v / size * 1000)))) for v in box]
