"""HTML report: the page exists, every image it references exists, and the content reaches the page."""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from vlkit.train import plot_confusion_matrix, plot_retrieval_grid, write_report


def write_log(path: Path, steps: int = 30, skipped: int = 3) -> None:
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 2.0 / step, "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 1.0}
        lines.append({**record, "samples_per_second": 100.0, "skipped": skipped if step > 10 else 0})
        if step % 10 == 0:
            lines.append({"step": step, "eval": {"zero_shot": {"top1": step / 40}, "retrieval": {"r@1": step / 50}}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def referenced_images(report: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', report.read_text())


def test_report_references_existing_pngs(tmp_path: Path) -> None:
    log_path = tmp_path / "run" / "log.jsonl"
    log_path.parent.mkdir()
    write_log(log_path)
    elsewhere = tmp_path / "figures"
    plot_confusion_matrix(
        np.array([[5, 1, 0], [2, 3, 1], [0, 0, 6]]),
        ["circle", "square", "triangle"],
        elsewhere / "confusion.png",
        "zero-shot shapes",
    )
    colors = [(255, 0, 0), (0, 128, 255)]
    plot_retrieval_grid(
        [Image.new("RGB", (32, 24), color) for color in colors],
        ["image 0", "image 1"],
        [[("a red square", True), ("a blue circle", False)], [("a red square", False), ("a blue circle", True)]],
        elsewhere / "retrieval.png",
    )
    out_dir = tmp_path / "run"
    report = write_report(
        out_dir,
        "CLIP <tiny> on ShapesWorld",
        {"zero_shot": {"top1": 0.75, "top5": 1.0}, "retrieval": {"image_to_text": {"r@1": 0.5}}, "steps": 30},
        log_path,
        figures=[
            ("Confusion matrix", elsewhere / "confusion.png"),
            ("Retrieval examples", elsewhere / "retrieval.png"),
        ],
        notes=["trained on CPU in bf16"],
    )
    assert report == out_dir / "report.html"
    page = report.read_text()
    sources = referenced_images(report)
    assert {"loss.png", "lr.png", "eval.png", "confusion.png", "retrieval.png"} <= set(sources)
    for source in sources:
        assert (out_dir / source).is_file() and (out_dir / source).read_bytes().startswith(b"\x89PNG"), source
    assert "CLIP &lt;tiny&gt; on ShapesWorld" in page
    assert "zero_shot / top1" in page and "retrieval / image_to_text / r@1" in page
    assert "3 samples were skipped" in page
    assert "trained on CPU in bf16" in page


def test_report_without_log_or_skips(tmp_path: Path) -> None:
    report = write_report(tmp_path, "metrics only", {"accuracy": 0.5}, None)
    page = report.read_text()
    assert referenced_images(report) == []
    assert "skipped" not in page and "accuracy" in page
