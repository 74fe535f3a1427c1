"""A real fine-tuning task with no download: text -> SVG.

Descriptions such as "medium red circle" or "small blue square at top left" map to one
canonical SVG document. Every combination of shape, colour, size and position is enumerated
and split, seeded, into train and held-out combinations (held-out descriptions are never seen
in training). `evaluate_svg` reports, on the held-out split, the rate of valid SVG and of exact
shape / colour / size / position matches.
"""

from __future__ import annotations

import itertools
import random
import re
import xml.etree.ElementTree as ET
from typing import Any, Sequence

import attrs

from stratlm.engine import Engine
from stratlm.core.model import LoadedModel
from stratlm import progress as bars

SHAPES = ("circle", "square", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "pink")
SIZES = {"small": 10, "medium": 20, "large": 30}
POSITIONS = {
    "": (50, 50), "at top left": (25, 25), "at top right": (75, 25), "at bottom left": (25, 75), "at bottom right": (75, 75),
    "at the top": (50, 25), "at the bottom": (50, 75), "on the left": (25, 50), "on the right": (75, 50),
}
SVG_OPEN = '<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100" viewBox="0 0 100 100">'


@attrs.frozen
class Spec:
    shape: str
    colour: str
    size: str
    position: str = ""

    @property
    def description(self) -> str:
        return " ".join(x for x in (self.size, self.colour, self.shape, self.position) if x)

    @property
    def svg(self) -> str:
        return f"{SVG_OPEN}{element(self)}</svg>"


def element(spec: Spec) -> str:
    s = SIZES[spec.size]
    cx, cy = POSITIONS[spec.position]
    fill = f'fill="{spec.colour}"'
    if spec.shape == "circle":
        return f'<circle cx="{cx}" cy="{cy}" r="{s}" {fill}/>'
    if spec.shape == "square":
        return f'<rect x="{cx - s}" y="{cy - s}" width="{2 * s}" height="{2 * s}" {fill}/>'
    if spec.shape == "rectangle":
        return f'<rect x="{cx - 3 * s // 2}" y="{cy - s}" width="{3 * s}" height="{2 * s}" {fill}/>'
    return f'<polygon points="{cx},{cy - s} {cx + s},{cy + s} {cx - s},{cy + s}" {fill}/>'


def all_specs() -> list[Spec]:
    return [Spec(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def make_splits(n_heldout: int = 64, seed: int = 0) -> tuple[list[Spec], list[Spec]]:
    """(train, held-out): disjoint combinations, seeded."""
    specs = all_specs()
    random.Random(seed).shuffle(specs)
    return specs[n_heldout:], specs[:n_heldout]


def records(specs: Sequence[Spec]) -> list[dict[str, str]]:
    """{"prompt", "completion"} records, the JSONL format `stratlm train dora` reads."""
    return [{"prompt": s.description, "completion": s.svg} for s in specs]


# -- reading an answer back -----------------------------------------------------------------------------
def parse_svg(text: str) -> Spec | None:
    """The shape, colour, size and position an answer draws, or None if it is not valid SVG of one shape."""
    found = re.search(r"<svg\b.*?</svg>", text, re.S)
    if not found:
        return None
    try:
        root = ET.fromstring(found.group(0))
    except ET.ParseError:
        return None
    children = list(root)
    if not root.tag.endswith("svg") or len(children) != 1:
        return None
    el = children[0]
    tag = el.tag.rsplit("}", 1)[-1]
    try:
        if tag == "circle":
            shape, size, centre = "circle", float(el.get("r")), (float(el.get("cx")), float(el.get("cy")))
        elif tag == "rect":
            w, h = float(el.get("width")), float(el.get("height"))
            shape = "square" if w == h else "rectangle"
            size = w / 2 if shape == "square" else w / 3
            centre = (float(el.get("x")) + w / 2, float(el.get("y")) + h / 2)
        elif tag == "polygon":
            points = [tuple(float(v) for v in p.split(",")) for p in el.get("points", "").split()]
            if len(points) != 3:
                return None
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            shape, size, centre = "triangle", (max(xs) - min(xs)) / 2, ((max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2)
        else:
            return None
    except (TypeError, ValueError):
        return None
    size_name = next((name for name, value in SIZES.items() if value == size), f"{size:g}")
    position = next((name for name, value in POSITIONS.items() if value == centre), f"{centre}")
    return Spec(shape=shape, colour=el.get("fill", ""), size=size_name, position=position)


@attrs.frozen
class SvgScore:
    n: int
    valid: float
    shape: float
    colour: float
    size: float
    position: float
    exact: float  # all four right
    examples: tuple[tuple[str, str], ...] = attrs.field(converter=tuple)  # (description, answer), a few

    def line(self) -> str:
        return (f"valid SVG {self.valid:.1%}  shape {self.shape:.1%}  colour {self.colour:.1%}  size {self.size:.1%}  "
                f"position {self.position:.1%}  all four {self.exact:.1%}  (n={self.n})")


def score_answers(specs: Sequence[Spec], answers: Sequence[str]) -> SvgScore:
    parsed = [parse_svg(a) for a in answers]
    n = len(specs)

    def rate(field: str) -> float:
        return sum(1 for s, p in zip(specs, parsed) if p is not None and getattr(p, field) == getattr(s, field)) / n

    return SvgScore(n=n, valid=sum(p is not None for p in parsed) / n, shape=rate("shape"), colour=rate("colour"), size=rate("size"),
                    position=rate("position"), exact=sum(1 for s, p in zip(specs, parsed) if p == s) / n,
                    examples=[(s.description, a) for s, a in list(zip(specs, answers))[:3]])


def evaluate_svg(loaded: LoadedModel, specs: Sequence[Spec], max_tokens: int = 96, batch_size: int = 16, progress_bar: bool | None = None,
                 **engine_options: Any) -> SvgScore:
    """Greedy answers to the descriptions (batched, under a bar: see stratlm.progress), scored."""
    with Engine(loaded, strategy="batch", batch_size=batch_size, **engine_options) as engine:
        handles = [engine.submit(s.description, max_tokens=max_tokens, temperature=0.0) for s in specs]
        results = bars.collect(handles, "held-out answers", progress_bar=progress_bar)
    return score_answers(specs, [r.text for r in results])
