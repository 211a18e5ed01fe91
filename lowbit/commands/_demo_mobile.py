"""The demo's mobile section: the static int8 digits CNN exported to each mobile runtime.

The QDQ model of the ONNX Runtime section goes through `lowbit.deploy.export_model` to ORT
Mobile (.ort), ExecuTorch (.pte) and LiteRT (.tflite); each file is run in its own runtime on
the test images: parity with ONNX Runtime on the QDQ model, file size against the target's float
export, latency against that float file. A target whose packages are missing gets a row naming
the extra to install, so the demo runs (fast) on a fresh machine without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADING = "On mobile runtimes"
THREADS, REPEATS = 1, 20


def run_mobile_section(int8_model: Path, test_data: Path, batch: int, workdir: Path) -> dict[str, Any]:
    from lowbit.deploy.export import TARGETS, export_model, missing_extra, target_for

    rows = []
    for suffix in TARGETS:
        target = target_for(f"model{suffix}")
        if missing_extra(target):
            rows.append({"target": target.NAME, "file": suffix, "install": f"pip install 'lowbit[{target.EXTRA}]'"})
            continue
        report = export_model(int8_model, workdir / f"digits_int8{suffix}", data=test_data, samples=batch,
                              batch=batch, threads=THREADS, repeats=REPEATS)
        rows.append({"target": target.NAME, "file": suffix, **report.to_dict()})
    return {"batch": batch, "threads": THREADS, "repeats": REPEATS, "rows": rows}


def format_mobile_section(section: dict[str, Any]) -> str:
    header = ["target", "file", "top-1 agreement", "max error", "size (B)", "smaller", "int8 ms", "float ms", "speedup"]
    body = []
    for r in section["rows"]:
        if "install" in r:
            body.append([r["target"], r["file"], f"not installed: {r['install']}"] + [""] * 6)
            continue
        body.append([r["target"], r["file"], f"{100 * r['top1_agreement']:.2f}%", f"{r['max_error_steps']:.2f} steps",
                     f"{r['file_bytes']:,}", f"{r['size_ratio']:.2f}x", f"{r['latency_ms']:.2f}",
                     f"{r['float_latency_ms']:.2f}", f"{r['speedup']:.2f}x"])
    # An install row spans the numeric columns; it does not widen them.
    widths = [max(len(row[i]) for row in [header] + body if i < 2 or not row[2].startswith("not installed"))
              for i in range(len(header))]

    def line(cells: list[str]) -> str:
        if cells[2].startswith("not installed"):
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]])
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([
        HEADING,
        "-" * len(HEADING),
        f"The static int8 model above, exported with `lowbit export` (lowbit's scales, not re-quantized) and run in "
        f"each runtime on the {section['batch']} test images as one batch; parity is against ONNX Runtime on the QDQ "
        f"model, size and latency against the same runtime's float export ({section['threads']} thread, median of "
        f"{section['repeats']} interleaved runs). x86 here; see docs/deploy.md for phones.",
        "",
        line(header), line(["-" * w for w in widths]), *(line(r) for r in body),
    ])


def interpret_mobile(section: dict[str, Any]) -> str:
    done = [r for r in section["rows"] if "install" not in r]
    missing = [r for r in section["rows"] if "install" in r]
    sentences = []
    if done:
        parity = "all match" if all(r["passed"] for r in done) else "NOT all match"
        low, high = min(r["size_ratio"] for r in done), max(r["size_ratio"] for r in done)
        ratio = f"{low:.1f}x" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}x"
        sentences.append(f"Exported to {', '.join(r['target'] for r in done)}, the int8 files {parity} ONNX Runtime "
                         f"(worst {max(r['max_error_steps'] for r in done):.2f} output steps) and are {ratio} smaller "
                         "than each runtime's float export.")
    if missing:
        sentences.append(f"{' and '.join(r['target'] for r in missing)} rows need "
                         f"{' and '.join(r['install'] for r in missing)}.")
    return " ".join(sentences)
