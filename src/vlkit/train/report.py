"""Self-contained HTML training reports and the plots other modules put in them.

``write_report`` turns a trainer's ``log.jsonl`` and a metrics dict into ``report.html`` with loss,
learning-rate and evaluation curves (PNG files beside it), an evaluation table, a skipped-sample notice and
any extra figures. ``plot_confusion_matrix`` and ``plot_retrieval_grid`` are the figures the zero-shot
classification and retrieval evaluations attach.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through pyplot, so
importing this module changes no global matplotlib backend and plotting works in threads and on servers.
"""

import html
import json
import math
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["plot_confusion_matrix", "plot_retrieval_grid", "write_report"]

_CORRECT_COLOR = "#1a7f37"
_OTHER_COLOR = "#333333"
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 960px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: 0.3em; }
h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; min-width: 50%; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) { background: #f7f7f7; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.notice { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.6em 1em; margin: 1em 0; }
"""


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in values.items():
        name = f"{prefix} / {key}" if prefix else str(key)
        rows.extend(_flatten(value, name) if isinstance(value, dict) else [(name, value)])
    return rows


def _read_log(log_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train, evaluations = [], []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval" in record:
            evaluations.append(record)
        elif "loss" in record:
            train.append(record)
    return train, evaluations


def _plot_series(steps: list[int], values: list[float], path: Path, title: str, ylabel: str, smooth: bool) -> None:
    figure = Figure(figsize=(7, 3.6))
    axes = figure.add_subplot()
    axes.plot(steps, values, color="#8fb3d9" if smooth else "#1f77b4", linewidth=1, label="per step")
    if smooth and len(values) >= 20:
        # A centred window shows the trend through minibatch noise without the lag of an exponential average.
        window = max(3, len(values) // 25)
        smoothed = np.convolve(values, np.full(window, 1.0 / window), mode="valid")
        centre = window // 2
        axes.plot(steps[centre : centre + len(smoothed)], smoothed, color="#1f4e79", linewidth=1.8, label="mean")
        axes.legend(frameon=False)
    if smooth and values and min(values) > 0 and max(values) / min(values) > 30:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    _save_figure(figure, path)


def _plot_evaluations(evaluations: list[dict[str, Any]], path: Path) -> bool:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in evaluations:
        for name, value in _flatten(record["eval"]):
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    if not series:
        return False
    names = sorted(series)[:16]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.4 * columns, 2.6 * rows))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = series[name]
        axes.plot(steps, values, marker="o", markersize=3, color="#2a7f62")
        axes.set_title(name, fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def _figure_html(source: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(quote(source))}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _place_beside(figure_path: Path, out_dir: Path, index: int) -> str:
    """Return the report-relative name of ``figure_path``, copying it next to the report when it lives elsewhere."""
    figure_path = Path(figure_path)
    if not figure_path.is_file():
        raise FileNotFoundError(f"report figure {figure_path} does not exist")
    if figure_path.resolve().parent == out_dir.resolve():
        return figure_path.name
    target = out_dir / figure_path.name
    if target.exists():
        target = out_dir / f"figure_{index}_{figure_path.name}"
    shutil.copy2(figure_path, target)
    return target.name


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict[str, Any],
    log_path: Path | None,
    figures: Sequence[tuple[str, Path]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write ``out_dir/report.html`` (plus its PNGs) and return its path.

    ``metrics`` may nest dicts; they are flattened into ``a / b`` rows. ``log_path`` is a trainer
    ``log.jsonl`` (or ``None``); ``figures`` are ``(caption, png_path)`` pairs, copied beside the report when
    they live elsewhere so the folder stays self-contained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"<h1>{html.escape(title)}</h1>"]

    train: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    if log_path is not None and Path(log_path).is_file():
        train, evaluations = _read_log(Path(log_path))
    skipped = int(train[-1].get("skipped", 0)) if train else 0
    if isinstance(metrics.get("skipped"), int):
        skipped = max(skipped, metrics["skipped"])
    if skipped:
        sections.append(
            f'<p class="notice"><strong>{skipped:,} samples were skipped</strong> during training '
            "(unreadable or invalid inputs dropped by the data pipeline); see <code>skipped</code> in the log.</p>"
        )

    if train:
        steps = [record["step"] for record in train]
        summary = f"{len(train)} logged steps, final loss {_format_value(train[-1]['loss'])}"
        speeds = [record["samples_per_second"] for record in train if "samples_per_second" in record]
        if speeds:
            summary += f", median throughput {_format_value(float(np.median(speeds)))} samples/s"
        sections.append(f"<h2>Training</h2><p>{html.escape(summary)}.</p>")
        _plot_series(steps, [record["loss"] for record in train], out_dir / "loss.png", "training loss", "loss", True)
        sections.append(_figure_html("loss.png", "Training loss per optimizer step."))
        if all("lr" in record for record in train):
            lrs = [record["lr"] for record in train]
            _plot_series(steps, lrs, out_dir / "lr.png", "learning rate", "lr", False)
            sections.append(_figure_html("lr.png", "Base learning rate (before lr_scale) per optimizer step."))
    if evaluations and _plot_evaluations(evaluations, out_dir / "eval.png"):
        sections.append(_figure_html("eval.png", "Evaluation metrics over training steps."))

    rows = _flatten(metrics)
    if rows:
        body = "".join(
            f'<tr><td>{html.escape(name)}</td><td class="value">{html.escape(_format_value(value))}</td></tr>'
            for name, value in rows
        )
        sections.append(f"<h2>Evaluation</h2><table><tr><th>metric</th><th>value</th></tr>{body}</table>")

    if figures:
        sections.append("<h2>Figures</h2>")
        for index, (caption, figure_path) in enumerate(figures):
            sections.append(_figure_html(_place_beside(figure_path, out_dir, index), caption))
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        sections.append(f"<h2>Notes</h2><ul>{items}</ul>")

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    report_path = out_dir / "report.html"
    report_path.write_text(page, encoding="utf-8")
    return report_path


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Save a confusion matrix (rows: true class, columns: predicted class) as a PNG.

    Colours show each row normalised to sum 1 (per-class recall), so rare classes stay readable; the cells of
    matrices up to 25 classes are annotated with the raw values.
    """
    matrix = np.asarray(matrix)
    size = len(class_names)
    if matrix.shape != (size, size):
        raise ValueError(f"confusion matrix has shape {matrix.shape}, expected ({size}, {size}) for the class names")
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, dtype=float), where=row_sums != 0)
    side = min(20.0, max(4.0, 0.45 * size + 2.0))
    figure = Figure(figsize=(side + 1.2, side))
    axes = figure.add_subplot()
    image = axes.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    axes.set_xticks(range(size), labels=class_names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(size), labels=class_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if size <= 25:
        integral = np.issubdtype(matrix.dtype, np.integer)
        for row in range(size):
            for column in range(size):
                text = f"{matrix[row, column]:d}" if integral else f"{matrix[row, column]:.2g}"
                color = "white" if normalized[row, column] > 0.5 else "black"
                axes.text(column, row, text, ha="center", va="center", color=color, fontsize=7)
    _save_figure(figure, Path(path))


def plot_retrieval_grid(
    images: list[Image.Image], queries: list[str], top_captions: list[list[tuple[str, bool]]], path: Path
) -> None:
    """Save one row per query image: the image, its label ``queries[i]`` and its ranked retrieved captions.

    ``top_captions[i]`` holds ``(caption, is_correct)`` pairs best first; correct captions are drawn green
    with a check mark.
    """
    if not len(images) == len(queries) == len(top_captions):
        raise ValueError(
            f"got {len(images)} images, {len(queries)} queries and {len(top_captions)} caption lists; "
            "they must have one entry per row"
        )
    rows = max(1, len(images))
    top_k = max((len(captions) for captions in top_captions), default=1)
    row_height = max(1.8, 0.34 * (top_k + 1))
    figure = Figure(figsize=(9.0, row_height * rows))
    grid = figure.add_gridspec(rows, 2, width_ratios=[1, 3.2], wspace=0.05)
    for row, (image, query, captions) in enumerate(zip(images, queries, top_captions, strict=True)):
        image_axes = figure.add_subplot(grid[row, 0])
        image_axes.imshow(np.asarray(image.convert("RGB")))
        image_axes.set_axis_off()
        text_axes = figure.add_subplot(grid[row, 1])
        text_axes.set_axis_off()
        step = 1.0 / (top_k + 1)
        text_axes.text(0.0, 1.0, textwrap.shorten(query, 90), fontweight="bold", va="top", fontsize=9)
        for rank, (caption, correct) in enumerate(captions, start=1):
            marker = "\u2713" if correct else "  "
            text_axes.text(
                0.0,
                1.0 - rank * step,
                f"{rank}. {marker} {textwrap.shorten(caption, 95)}",
                color=_CORRECT_COLOR if correct else _OTHER_COLOR,
                fontweight="bold" if correct else "normal",
                va="top",
                fontsize=8.5,
            )
    _save_figure(figure, Path(path))
