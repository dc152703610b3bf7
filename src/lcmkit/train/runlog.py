"""The loss log of a training run: a CSV file (one row per logged step) and a PNG plot of it.

The plot is drawn with PIL, so training needs no plotting library; the CSV is the record to analyse elsewhere.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


class LossLog:
    """Append-only CSV of `step, loss, lr, <metrics...>`; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [
                    {k: float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)
                    if float(row["step"]) <= resume_step
                ]
        self._rewrite()

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            if self.rows:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(self.rows)

    def append(self, step: int, loss: float, **metrics: float) -> None:
        row = {"step": float(step), "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        if self.rows and list(row) != self.columns:
            raise ValueError(f"log row columns {list(row)} differ from the log's columns {self.columns}")
        first = not self.rows
        self.rows.append(row)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if first:
                writer.writeheader()
            writer.writerow(row)

    def losses(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), r["loss"]) for r in self.rows]

    def plot(self, path: str | Path, title: str = "loss") -> None:
        plot_losses(self.losses(), path, title)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(points: Sequence[tuple[int, float]], path: str | Path, title: str = "loss") -> None:
    """Draw loss against step (raw in grey, moving average in blue) to a PNG; log y-axis when all losses are > 0."""
    width, height, left, right, top, bottom = 720, 400, 70, 20, 30, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        draw.text((left, height // 2), "no finite losses logged", fill="black", font=font)
        image.save(path)
        return
    log_y = all(v > 0 for _, v in finite)
    steps = [s for s, _ in finite]
    ys = [math.log10(v) if log_y else v for _, v in finite]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def xy(step: float, y: float) -> tuple[float, float]:
        px = left + (step - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        _, py = xy(x0, y)
        label = f"{10**y:.3g}" if log_y else f"{y:.3g}"
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((4, py - 6), label, fill="black", font=font)
        step = x0 + (x1 - x0) * k / 4
        px, _ = xy(step, y0)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    if len(ys) > 1:
        draw.line([xy(s, y) for s, y in zip(steps, ys, strict=True)], fill=(180, 180, 180), width=1)
        smooth = _smooth(ys, max(1, len(ys) // 50))
        draw.line([xy(s, y) for s, y in zip(steps, smooth, strict=True)], fill=(30, 70, 220), width=2)
    else:
        px, py = xy(steps[0], ys[0])
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(30, 70, 220))
    draw.text((width // 2 - 10, height - 16), "step", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
