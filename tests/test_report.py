"""`--report DIR`: report.html (inline SVG, parses, renders in headless Chromium) and report.md."""

from __future__ import annotations

import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from _onnx_quant_models import image_calib, outlier_cnn
from lowbit.search.budget import Layer
from lowbit.cli import main
from lowbit.onnx.quantize import quantize_onnx, read_plan
from lowbit.report import collect
from lowbit.report.markdown import budget_rows

CHROMIUM = Path("/usr/bin/chromium")
BAR_RGB, CLIP_RGB = (0x4C, 0x78, 0xA8), (0xD6, 0x27, 0x28)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A per-tensor CNN with one outlier weight, through `quantize --max-drop --report` and `analyze --report`."""
    root = tmp_path_factory.mktemp("report")
    float_path = outlier_cnn(root / "outlier.onnx")
    calib = image_calib(root / "calib.npz", n=16)
    quant = root / "q.onnx"
    assert main(["quantize", str(float_path), "-o", str(quant), "--mode", "static", "--calib", str(calib), "--per-tensor",
                 "--batch-size", "8", "--max-drop", "0.002", "--report", str(root / "budget")]) == 0
    assert main(["analyze", str(float_path), str(quant), "--data", str(calib), "--report", str(root / "analyze")]) == 0
    return {"root": root, "float": float_path, "quant": quant, "calib": calib}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.sections: list[str] = []
        self.classes: dict[str, int] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if attrs.get("class"):
            self.classes[attrs["class"]] = self.classes.get(attrs["class"], 0) + 1
        for key in ("src", "href"):
            if attrs.get(key):
                self.external.append(attrs[key])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_budget_report_sections_and_svg(reports):
    page = _parse(reports["root"] / "budget" / "report.html")
    assert page.sections == ["summary", "fidelity", "budget", "plan", "sensitivity", "histograms"]
    assert not page.external  # self-contained: nothing to fetch
    plan = read_plan(reports["quant"])
    drawn = len(plan.quantized("weight")) + len([e for e in plan.quantized("activation") if e.shares is None])
    assert page.classes["card"] == drawn  # one histogram for every quantized weight and activation
    assert page.tags["svg"] == drawn + 2  # + SQNR bars + speed-vs-fidelity scatter
    assert page.classes["clip"] == 2 * drawn and page.classes["grid"] == drawn
    assert page.tags["circle"] >= 2  # one point per evaluated candidate
    markdown = (reports["root"] / "budget" / "report.md").read_text()
    for heading in ("## Summary", "## Accuracy budget search", "## Per-layer sensitivity", "## Clipping error"):
        assert heading in markdown
    analyze = _parse(reports["root"] / "analyze" / "report.html")
    assert analyze.sections == ["summary", "fidelity", "plan", "sensitivity", "histograms"]


def _md_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after `heading` (header row first)."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_budget_table_shows_the_fallback_gain(reports):
    """The search ranks units by the gain of falling them back; the table must show that number."""
    rows = _md_rows((reports["root"] / "budget" / "report.md").read_text(), "## Accuracy budget search")
    header, body = rows[0], rows[1:]
    assert header[3] == "fallback gain (cosine)"
    gains = {row[0]: row[3] for row in body}
    assert float(gains["/conv/conv.0/Conv"]) > 0.02  # the outlier layer: falling it back recovers the most
    assert all(g == "not measured" or abs(float(g)) < 1 for g in gains.values())
    assert {row[0]: row[4] for row in body}["/conv/conv.0/Conv"] == "float"
    assert "fallback gain (cosine)" in (reports["root"] / "budget" / "report.html").read_text()

    fake = type("Budget", (), {"metric": "top1", "excluded": ["b"],
                               "layers": [Layer("a", "Conv", 10, gain=-0.0123, solo_drop=0.5),
                                          Layer("b", "Gemm", 1000, gain=None)]})()
    header, body = budget_rows(fake)
    assert header[3] == "fallback gain (top1)"
    assert body == [["a", "Conv", "10", "-1.23e-02", "int8"], ["b", "Gemm", "1,000", "not measured", "float"]]


def test_analyze_report_shows_both_sweeps(reports):
    root = reports["root"]
    quant = root / "plain.onnx"
    quantize_onnx(reports["float"], quant, calib=reports["calib"], per_channel=False, batch_size=8, verify=False)
    assert main(["analyze", str(reports["float"]), str(quant), "--data", str(reports["calib"]), "--batch-size", "8",
                 "--sweep", "both", "--report", str(root / "sweeps")]) == 0
    page = _parse(root / "sweeps" / "report.html")
    assert page.sections == ["summary", "fidelity", "plan", "sensitivity", "sweep", "all-but", "histograms"]
    assert page.tags["svg"] == page.classes["card"] + 3  # + SQNR bars + one bar chart per sweep
    markdown = (root / "sweeps" / "report.md").read_text()
    rows = _md_rows(markdown, "## All but this layer")
    assert rows[0][:3] == ["layer float, rest int8 (most recovery first)", "op", "cosine recovery"]
    assert len(rows) == 6 and rows[1][0] == "/conv/conv.0/Conv" and float(rows[1][2]) > 0.02
    recoveries = [float(r[2]) for r in rows[1:]]
    assert recoveries == sorted(recoveries, reverse=True)
    # Recovery = cosine with the layer float minus the fully quantized model's, which fidelity shows.
    whole = float(_md_rows(markdown, "## Fidelity")[1][1])
    assert float(rows[1][4]) - whole == pytest.approx(float(rows[1][2]), abs=2e-5)
    solo = _md_rows(markdown, "## Quantize only this layer")
    assert solo[1][0] == "/conv/conv.0/Conv" and len(solo) == 6


def test_clipping_statistics_match_numpy(reports):
    """The graph input's clipped share and error, recomputed with NumPy from the stored grid."""
    content = collect(reports["float"], reports["quant"], reports["calib"], batch_size=8, measure_speed=False)
    plan = read_plan(reports["quant"])
    image = next(h for h in content.histograms if h.tensor == "image")
    entry = plan.get("image", "activation")
    s, z = float(np.asarray(entry.qparams.scale).ravel()[0]), float(np.asarray(entry.qparams.zero_point).ravel()[0])
    x = np.load(reports["calib"])["image"].astype(np.float64)
    steps = x / s + z
    expected = np.mean((steps < entry.spec.qmin - 0.5) | (steps > entry.spec.qmax + 0.5))
    assert image.clipped == pytest.approx(expected, abs=2e-3)  # histogram bins blur the threshold slightly
    err = x - (np.clip(np.rint(steps), entry.spec.qmin, entry.spec.qmax) - z) * s
    assert image.rounding_mse + image.clipping_mse == pytest.approx(np.mean(err ** 2), rel=0.1)


def test_weight_error_split_matches_numpy():
    """Per-tensor weight with an outlier: rounding + clipping MSE equals NumPy's error exactly."""
    from lowbit.numerics import qparams_for
    from lowbit.onnx.planner import WEIGHT_SPEC
    from lowbit.plan import PlanEntry
    from lowbit.report.content import _from_values

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    qp = qparams_for(w, WEIGHT_SPEC)
    w[0, 0, 0, 0] = 50.0  # beyond the grid chosen before: it clips
    h = _from_values(PlanEntry("w", "weight", spec=WEIGHT_SPEC, qparams=qp), w)
    s = float(np.asarray(qp.scale).ravel()[0])
    q = np.clip(np.rint(w / s), WEIGHT_SPEC.qmin, WEIGHT_SPEC.qmax)
    err = w - q * s
    assert h.clipped == pytest.approx(1 / w.size)
    assert h.clipping_mse == pytest.approx((50.0 - WEIGHT_SPEC.qmax * s) ** 2 / w.size, rel=1e-5)
    assert h.rounding_mse + h.clipping_mse == pytest.approx(np.mean(err.astype(np.float64) ** 2), rel=1e-5)
    assert h.clip == pytest.approx((WEIGHT_SPEC.qmin * s, WEIGHT_SPEC.qmax * s))


def _decode_png(data: bytes) -> np.ndarray:
    """RGB(A) pixels of an 8-bit PNG (what Chromium writes), with NumPy and zlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    ch = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * ch)
    out = np.zeros((height, width * ch), np.int64)
    prev = np.zeros(width * ch, np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = np.cumsum(line.reshape(width, ch), axis=0).ravel() & 255
        elif kind == 2:
            cur = (line + prev) & 255
        else:
            cur = np.zeros_like(line)
            for x in range(line.size):
                a = cur[x - ch] if x >= ch else 0
                b, c = prev[x], (prev[x - ch] if x >= ch else 0)
                if kind == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + p) & 255
        out[y], prev = cur, cur
    return out.reshape(height, width, ch)[:, :, :3]


def test_report_renders_in_headless_chromium(reports, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium not installed at /usr/bin/chromium (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    page = (reports["root"] / "budget" / "report.html").resolve()
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = _decode_png(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20  # not a blank page
    # The SVG plots were drawn: bar-blue and clip-red pixels are on screen.
    assert (np.abs(pixels - BAR_RGB).sum(-1) < 12).sum() > 2000
    assert (np.abs(pixels - CLIP_RGB).sum(-1) < 12).sum() > 50


def test_budget_table_names_each_layers_fallback_precision():
    """With a fallback ladder (int8 -> int16 -> float, or weight-only int4 -> int8), the table says
    which step each layer ended at, not just "float"."""
    from lowbit.search.budget import BudgetResult

    budget = BudgetResult.__new__(BudgetResult)
    budget.metric, budget.excluded, budget.start = "cosine", ["b", "c"], "int4"
    budget.precision = {"b": "int8", "c": "float"}
    budget.layers = [Layer("a", "MatMul", 10, gain=None), Layer("b", "MatMul", 20, gain=0.1),
                     Layer("c", "MatMul", 30, gain=0.2)]
    header, body = budget_rows(budget)
    assert [row[4] for row in body] == ["int4", "int8", "float"]


def test_quantize_report_of_a_dynamic_model_has_its_sensitivity(tmp_path):
    from _onnx_quant_models import tiny_encoder, token_calib

    source, calib = tiny_encoder(tmp_path / "enc.onnx"), token_calib(tmp_path / "c.npz")
    assert main(["quantize", str(source), "-o", str(tmp_path / "dyn.onnx"), "--mode", "dynamic", "--calib", str(calib),
                 "--no-speed", "--report", str(tmp_path / "report")]) == 0
    rows = _md_rows((tmp_path / "report" / "report.md").read_text(), "## Per-layer sensitivity")
    assert len(rows) > 4  # header + the encoder's int8 MatMuls
    assert "own int8 MatMul" in (tmp_path / "report" / "report.html").read_text()
