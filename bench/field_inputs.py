"""Realistic inputs made offline for the field corpus (bench/field.py, tests/test_field_models.py).

Sources: scikit-learn's two sample photos, text rendered with Pillow in the system's DejaVu fonts
(Pillow's own font when none is installed), English words from Python's documentation, and speech
synthesized by espeak-ng (Debian package) at run time. Every generator takes a seed, so the
calibration and evaluation splits are disjoint and reproducible.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf", "/usr/share/fonts/truetype/*/*.ttf")
CAPTCHA_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's sample photos (china.jpg, flower.jpg), RGB uint8 427x640."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(image) for image in load_sample_images().images]


def photo_views(count: int, seed: int, *, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """`count` different crops/flips/scales of the sample photos (RGB uint8); `size` = (h, w) to resize to."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    views = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        scale = rng.uniform(0.6, 1.0)
        ch, cw = int(h * scale), int(w * scale)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        view = photo[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        out_size = size or (ch, cw)
        views.append(np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize(out_size[::-1], Image.BILINEAR)))
    return views


def fonts() -> list[str]:
    found = sorted({p for pattern in FONT_GLOBS for p in glob.glob(pattern)})
    return [p for p in found if "Oblique" not in p and "Italic" not in p] or [""]


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def english_words() -> list[str]:
    """Alphabetic words of 2-12 letters from Python's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    return sorted(set(re.findall(r"\b[A-Za-z]{2,12}\b", text)))


def text_lines(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = english_words()
    lines = []
    for _ in range(count):
        picked = [str(words[i]) for i in rng.integers(0, len(words), rng.integers(2, 6))]
        if rng.random() < 0.3:
            picked.append(str(rng.integers(0, 100000)))
        lines.append(" ".join(picked))
    return lines


def text_line_images(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """Single rendered text lines (RGB uint8, tight crop with a margin) and their text.

    Backgrounds alternate between plain paper-like colours and crops of the sample photos, so the
    recognizer sees the contrast range of real scene text."""
    rng = np.random.default_rng(seed)
    font_paths = fonts()
    photos = sample_photos()
    out = []
    for i, line in enumerate(text_lines(count, seed)):
        font = _font(font_paths[i % len(font_paths)], int(rng.integers(22, 40)))
        left, top, right, bottom = font.getbbox(line)
        w, h = right - left + 16, bottom - top + 12
        if i % 3 == 2:
            photo = photos[i % 2]
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, max(1, photo.shape[1] - w))
            base = Image.fromarray(photo[y:y + h, x:x + w]).resize((w, h))
            ink = (255, 255, 255) if np.asarray(base).mean() < 128 else (0, 0, 0)
        else:
            base = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        ImageDraw.Draw(base).text((8 - left, 6 - top), line, font=font, fill=ink)
        out.append((np.asarray(base), line))
    return out


def document_page(seed: int, *, size: tuple[int, int] = (640, 480), on_photo: bool = False) -> np.ndarray:
    """A page of rendered text lines (RGB uint8, h x w = `size`), on paper or on a sample photo."""
    rng = np.random.default_rng(seed)
    h, w = size
    if on_photo:
        photo = sample_photos()[seed % 2]
        page = Image.fromarray(photo).resize((w, h))
    else:
        page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(page)
    font_paths = fonts()
    y = int(rng.integers(10, 40))
    for line in text_lines(40, seed):
        font = _font(font_paths[int(rng.integers(0, len(font_paths)))], int(rng.integers(18, 34)))
        left, top, right, bottom = font.getbbox(line)
        if y + bottom - top > h - 10:
            break
        x = int(rng.integers(10, max(11, w - (right - left) - 10)))
        ink = (255, 255, 255) if on_photo and rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 70, 3))
        draw.text((x - left, y - top), line, font=font, fill=ink)
        y += bottom - top + int(rng.integers(8, 30))
    return np.asarray(page)


def captcha_images(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """160x60 captcha-style images (RGB uint8): 4-6 characters of 0-9A-Z, jittered, with noise lines."""
    rng = np.random.default_rng(seed)
    font_paths = [p for p in fonts() if "Mono" in p or "Bold" in p] or fonts()
    out = []
    for _ in range(count):
        text = "".join(rng.choice(list(CAPTCHA_ALPHABET), int(rng.integers(4, 7))))
        image = Image.new("RGB", (160, 60), tuple(int(v) for v in rng.integers(190, 256, 3)))
        draw = ImageDraw.Draw(image)
        font = _font(font_paths[int(rng.integers(0, len(font_paths)))], int(rng.integers(26, 34)))
        x = int(rng.integers(4, 14))
        step = (150 - x) // len(text)
        for ch in text:
            draw.text((x, int(rng.integers(4, 18))), ch, font=font,
                      fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
            x += step
        for _ in range(int(rng.integers(1, 4))):
            draw.line([tuple(int(v) for v in rng.integers(0, 160, 2)), tuple(int(v) for v in rng.integers(0, 60, 2))],
                      fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
        out.append((np.asarray(image), text))
    return out


SPEECH_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get this message.",
    "Quantization makes the network smaller and faster.",
    "It is going to rain this afternoon, so take an umbrella.",
    "Seven hundred and forty two people attended the meeting.",
    "Turn left at the next corner and walk for two minutes.",
    "The train to the airport leaves every fifteen minutes.",
    "She sells sea shells by the sea shore.",
)


def speech_clip(seed: int, *, sample_rate: int = 16000, utterances: int = 3) -> np.ndarray:
    """Synthesized English speech (espeak-ng) with pauses and low background noise, float32 mono.

    Raises RuntimeError when espeak-ng is not installed (apt-get install espeak-ng)."""
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; apt-get install -y espeak-ng")
    rng = np.random.default_rng(seed)
    voices = ("en", "en-us", "en+f3", "en+m3", "en-gb")
    pieces = [np.zeros(int(sample_rate * rng.uniform(0.3, 1.0)), np.float32)]
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(utterances):
            path = Path(tmp) / f"{k}.wav"
            sentence = SPEECH_SENTENCES[int(rng.integers(0, len(SPEECH_SENTENCES)))]
            subprocess.run(["espeak-ng", "-v", voices[int(rng.integers(0, len(voices)))],
                            "-s", str(int(rng.integers(140, 190))), "-w", str(path), sentence],
                           check=True, capture_output=True)
            with wave.open(str(path)) as wav:
                rate = wav.getframerate()
                audio = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0
            pieces.append(resample_poly(audio, sample_rate, rate).astype(np.float32) * rng.uniform(0.3, 0.9))
            pieces.append(np.zeros(int(sample_rate * rng.uniform(0.4, 1.2)), np.float32))
    clip = np.concatenate(pieces)
    return (clip + rng.normal(0, 0.003, clip.shape)).astype(np.float32)
