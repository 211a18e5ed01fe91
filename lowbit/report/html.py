"""The self-contained HTML page: inline CSS and inline SVG, no script, nothing loaded from anywhere."""

from __future__ import annotations

from html import escape

from lowbit.report import svg
from lowbit.report.content import ReportContent, TensorHistogram
from lowbit.report.markdown import (auto_rows, budget_rows, fidelity_rows, overview_rows, plan_rows,
                                    sensitivity_rows, sweep_rows, sweep_summary)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fde8e8;border-left:4px solid #d62728;padding:8px 12px;margin:8px 0}
.ok{background:#e8f5e9;border-left:4px solid #54a24b;padding:8px 12px;margin:8px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e3e3e3;padding:4px;font-size:12px;width:424px}
.muted{color:#666;font-size:13px}
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(value: str, tag: str) -> str:
        numeric = tag == "td" and _is_number(value)
        return f'<{tag}{" class=n" if numeric else ""}>{escape(value)}</{tag}>'

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(cell(str(c), "td") for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _is_number(value: str) -> bool:
    try:
        float(value.replace(",", ""))
        return True
    except ValueError:
        return False


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def render_html(content: ReportContent) -> str:
    parts = [f"<h1>{escape(content.title)}</h1>",
             f'<p class="muted">float model {escape(content.float_path)} → quantized model '
             f'{escape(content.quant_path)}</p>']
    parts.extend(f'<div class="warn">{escape(n)}</div>' for n in content.notes)
    parts.append(_section("summary", "Summary", _table(["", ""], overview_rows(content))))
    if content.verify is not None:
        parts.append(_section("fidelity", "Fidelity, size and speed (measured on ONNX Runtime)",
                              _table(*fidelity_rows(content.verify))))
    if content.budget is not None:
        parts.append(_section("budget", "Accuracy budget search", _budget(content)))
    if content.auto is not None:
        parts.append(_section("auto", "Automatic strategy (--mode auto)",
                              f'<div class="ok">kept {escape(content.auto.winner)}: {escape(content.auto.reason)}</div>'
                              + _table(*auto_rows(content.auto))))
    parts.append(_section("plan", "Plan", _table(*plan_rows(content.plan))))
    if content.sensitivity is not None:
        parts.append(_section("sensitivity", "Per-layer sensitivity", _sensitivity(content)))
    if content.sweep is not None:
        parts.append(_section("sweep", "Quantize only this layer", _sweep(content.sweep)))
    if content.all_but is not None:
        parts.append(_section("all-but", "All but this layer", _sweep(content.all_but)))
    parts.append(_section("histograms", "Weight and activation histograms with the int8 grid", _histograms(content)))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(content.title)}</title><style>{CSS}</style></head><body>"
            + "".join(parts) + "</body></html>\n")


def _budget(content: ReportContent) -> str:
    budget = content.budget
    verdict = (f'<div class="ok">budget met: {budget.metric} drop {budget.drop:.5f} ≤ {budget.max_drop:g}</div>'
               if budget.met else f'<div class="warn">budget NOT met: best {budget.metric} drop {budget.drop:.5f} > '
               f'{budget.max_drop:g}; the most accurate model found was saved</div>')
    points = [(t.speedup if t.speedup is not None else t.int8_mac_fraction, t.score,
               f"{t.stage}: {len(t.excluded)} fallen back, score {t.score:.5f}", t.excluded == budget.excluded)
              for t in budget.trials]
    x_label = ("speedup vs float (measured, same run)" if all(t.speedup is not None for t in budget.trials)
               else "share of MACs in int8")
    plot = svg.scatter(points, title="Speed vs fidelity of every candidate (green: saved)", x_label=x_label,
                       y_label=f"score ({budget.metric})", y_limit=budget.float_score - budget.max_drop)
    return verdict + plot + _table(*budget_rows(budget))


def _sensitivity(content: ReportContent) -> str:
    ranked = content.sensitivity.ranked()
    items = [(t.tensor, t.sqnr_db) for t in ranked]
    chart = svg.bar_chart(items, title="SQNR of each quantized activation vs float (worst first)", unit="dB",
                          threshold=20.0)
    own = ("that layer's own int8 MatMul adds when fed float inputs" if getattr(content.sensitivity, "mode", "static")
           == "dynamic" else "this tensor's own Q/DQ adds")
    note = ('<p class="muted">SQNR / cosine: quantized vs float model at this tensor (error accumulated so far); '
            f'own dB: the noise {own}. Red: below 20 dB.</p>')
    skipped = [[t.tensor, t.skipped] for t in content.sensitivity.tensors if t.skipped]
    extra = _table(["skipped tensor", "why"], skipped) if skipped else ""
    return chart + note + _table(*sensitivity_rows(content.sensitivity)) + extra


def _sweep(sweep) -> str:
    if sweep.kind == "all-but":
        items = [(r.node, r.recovery) for r in sweep.ranked()]
        title = "Cosine recovered when only this layer stays float (most first)"
    else:
        items = [(r.node, 1.0 - r.cosine) for r in sweep.ranked()]
        title = "Cosine lost when only this layer is quantized (most first)"
    chart = svg.bar_chart(items, title=title, unit="", value_format=".5f") if items else ""
    return f'<p class="muted">{escape(sweep_summary(sweep))}</p>' + chart + _table(*sweep_rows(sweep))


def _histograms(content: ReportContent) -> str:
    intro = ('<p class="muted">Grey ticks: the representable int8 levels; red dashed lines: the clipping thresholds '
             '(values beyond them saturate, as 1.62 becomes 1.106 in seed 004). Counts are log-scaled so tails '
             'show. Rounding / clipping MSE: mean squared error from values inside / outside the grid.</p>')
    cards = [_card(h) for h in content.histograms]
    missing = [[t, why] for t, why in content.not_drawn.items()]
    return intro + '<div class="cards">' + "".join(cards) + "</div>" + (
        _table(["not drawn", "why"], missing) if missing else "")


def _card(h: TensorHistogram) -> str:
    title = f"{h.role}: {h.tensor if len(h.tensor) <= 48 else '…' + h.tensor[-47:]}"
    plot = svg.histogram(h.edges, h.counts, title=title, grid=h.grid, clip=h.clip, x_label=h.x_label)
    sqnr = "exact" if h.sqnr_db is None else f"{h.sqnr_db:.1f} dB"
    stats = (f"clipped {100 * h.clipped:.3f}% · rounding MSE {h.rounding_mse:.3g} · clipping MSE "
             f"{h.clipping_mse:.3g} · SQNR {sqnr}")
    return f'<div class="card">{plot}<div>{escape(stats)}</div></div>'
