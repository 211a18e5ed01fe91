"""Reports: what was done to a model and what it cost, as a self-contained HTML page with inline
SVG plots (`report.html`) and a markdown summary (`report.md`).

`content` measures (plan, fidelity, sensitivity, histograms with the int8 grid), `svg` draws,
`html` and `markdown` lay out. Nothing is fetched from the network and no plotting library is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.report.content import ReportContent, collect
from lowbit.report.html import render_html
from lowbit.report.markdown import render_markdown


def write_report(out_dir: str | os.PathLike, content: ReportContent) -> tuple[Path, Path]:
    """Write report.html and report.md into `out_dir` (created if missing); returns their paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"report path {out_dir} is a file; give a folder for --report (it will hold report.html)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "report.html", out_dir / "report.md"
    for path, text in zip(paths, (render_html(content), render_markdown(content))):
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(staged, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(staged, path)
    return paths


def build_report(float_path: str | os.PathLike, quant_path: str | os.PathLike, data, out_dir: str | os.PathLike,
                 **measured) -> tuple[Path, Path]:
    """Measure what the caller did not (see `content.collect`) and write the report to `out_dir`."""
    return write_report(out_dir, collect(float_path, quant_path, data, **measured))


__all__ = ["ReportContent", "build_report", "collect", "write_report"]
