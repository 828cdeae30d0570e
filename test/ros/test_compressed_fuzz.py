"""Hostile compressed images (no DDS): a mutation fuzz, foreign formats (S2) and 16-bit PNG scaling (D8).

Every input must either decode to ``[H, W, 3]`` uint8 or raise ``ImageMessageError`` with a known reason: the node
counts those as ``rejected`` inputs, anything else would count as the node's own failure (D3).
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image as PILImage

from traj_forecast_ros.ros.conversions import ImageMessageError, compressed_msg_to_rgb, image_msg_to_rgb

REASONS = {"empty", "unsupported_format", "too_large", "corrupt_compressed"}
ALLOWED = ("JPEG", "PNG", "WEBP")
# Formats Pillow reads but image_transport never sends; DDS and BLP mutants made the old decoder raise
# NotImplementedError, EPS runs Ghostscript when it is installed.
FOREIGN = ("BMP", "GIF", "TIFF", "DDS", "BLP", "EPS", "ICO", "PPM", "TGA", "PCX", "SGI", "IM", "QOI", "MSP")
FUZZ_CASES = 4000


def message(data: bytes, fmt: str = "jpeg") -> SimpleNamespace:
    """A stand-in for sensor_msgs/CompressedImage (the decoder reads only ``data`` and ``format``)."""
    return SimpleNamespace(data=data, format=fmt)


def encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def seed_files() -> List[Tuple[str, bytes]]:
    """Small valid files: every allowed format in several modes, a 16-bit PNG, and foreign formats."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # [H, W, 3]
    seeds = [(fmt, encode(pixels, fmt, mode)) for fmt in ALLOWED for mode in ("RGB", "L")]
    seeds += [("PNG", encode(pixels, "PNG", mode)) for mode in ("RGBA", "P", "LA", "1")]
    ramp = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 21)  # [H, W] 12-bit values
    buffer = io.BytesIO()
    PILImage.fromarray(ramp).save(buffer, format="PNG")
    seeds.append(("PNG", buffer.getvalue()))
    for fmt in FOREIGN:
        for mode in ("RGB", "L", "P"):
            try:
                seeds.append((fmt, encode(pixels, fmt, mode)))
            except (OSError, ValueError, KeyError):
                continue  # this Pillow cannot write that format/mode
    return seeds


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption: flipped bytes, truncation, inserted bytes, extreme header fields or a spliced tail."""
    buffer = bytearray(data)
    choice = int(rng.integers(0, 5))
    if choice == 0:
        for _ in range(int(rng.integers(1, 8))):
            buffer[int(rng.integers(0, len(buffer)))] = int(rng.integers(0, 256))
    elif choice == 1:
        del buffer[int(rng.integers(0, len(buffer))):]
    elif choice == 2:
        position = int(rng.integers(0, len(buffer)))
        buffer[position:position] = rng.bytes(int(rng.integers(1, 64)))
    elif choice == 3:  # header fields (sizes, counts, flags) at their extremes
        position = int(rng.integers(0, min(len(buffer), 64)))
        extremes = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00")
        buffer[position:position + 4] = extremes[int(rng.integers(0, len(extremes)))]
    else:  # an allowed signature in front of anything
        signature = (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x10\x00\x00\x00WEBPVP8 ")
        buffer[0:0] = signature[int(rng.integers(0, len(signature)))]
    return bytes(buffer)


def check_outcome(data: bytes) -> str:
    """Decode ``data``; returns "ok" or the rejection reason (fails the test on any other outcome)."""
    try:
        rgb = compressed_msg_to_rgb(message(data), max_pixels=1 << 20)
    except ImageMessageError as exc:
        assert exc.reason in REASONS, exc.reason
        return exc.reason
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    return "ok"


@pytest.mark.timeout(60)
def test_fuzzed_compressed_images_decode_or_are_rejected_with_a_reason():
    """D3: a few thousand mutated files; no decoder exception other than ImageMessageError may escape."""
    rng = np.random.default_rng(1234)
    seeds = seed_files()
    assert {fmt for fmt, _ in seeds} >= set(ALLOWED) | {"DDS", "BLP"}
    outcomes = {}
    escaped = []
    for index in range(FUZZ_CASES):
        fmt, data = seeds[index % len(seeds)]
        mutated = data if index < len(seeds) else mutate(data, rng)
        try:
            outcome = check_outcome(mutated)
        except Exception as exc:  # noqa: BLE001 - collected so the failure lists every escaping type
            escaped.append(f"{fmt}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not escaped, f"{len(escaped)} inputs escaped as non-ImageMessageError: {sorted(set(escaped))[:10]}"
    assert outcomes.get("ok", 0) > 100 and outcomes.get("corrupt_compressed", 0) > 100
    assert outcomes.get("unsupported_format", 0) > 100


@pytest.mark.parametrize("fmt", ["EPS", "BMP", "GIF", "TIFF", "DDS", "ICO"])
def test_formats_other_than_jpeg_png_webp_are_rejected_unread(fmt, monkeypatch):
    """S2: only the formats image_transport produces are opened; EPS would run Ghostscript."""
    pixels = np.full((8, 8, 3), 200, np.uint8)
    try:
        data = encode(pixels, fmt)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    opened = []
    real_open = PILImage.open

    def recording_open(fp, mode="r", formats=None):
        opened.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(PILImage, "open", recording_open)
    with pytest.raises(ImageMessageError) as info:
        compressed_msg_to_rgb(message(data, fmt.lower()))
    assert info.value.reason == "unsupported_format"
    assert opened == [], "a foreign format reached Pillow's decoders"


def test_a_foreign_format_behind_an_allowed_signature_is_not_decoded_as_that_format(monkeypatch):
    from PIL import EpsImagePlugin

    eps = b"\x89PNG\r\n\x1a\n" + encode(np.zeros((8, 8, 3), np.uint8), "EPS")
    eps_opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: eps_opened.append(self))
    with pytest.raises(ImageMessageError) as info:
        compressed_msg_to_rgb(message(eps, "png"))
    assert info.value.reason == "corrupt_compressed" and eps_opened == []  # only the PNG decoder saw it


def test_webp_decodes():
    pixels = np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="WEBP", lossless=True)
    np.testing.assert_array_equal(compressed_msg_to_rgb(message(buffer.getvalue(), "webp")), pixels)


def test_16bit_png_is_scaled_like_raw_mono16_not_clipped():
    """D8: a 12-bit ramp in a 16-bit PNG keeps its gradient (the old decoder saturated 93.6 % of it)."""
    ramp = np.linspace(0, 4095, 64 * 64).astype(np.uint16).reshape(64, 64)  # [H, W] 12-bit sensor values
    buffer = io.BytesIO()
    PILImage.fromarray(ramp).save(buffer, format="PNG")
    compressed = compressed_msg_to_rgb(message(buffer.getvalue(), "png"))
    raw = image_msg_to_rgb(SimpleNamespace(encoding="mono16", height=64, width=64, step=128, is_bigendian=0,
                                           data=ramp.astype("<u2").tobytes()))
    np.testing.assert_array_equal(compressed, raw)
    saturated = float((compressed[..., 0] == 255).mean())
    assert saturated < 0.01, f"{saturated:.1%} of the pixels saturate"
    assert len(np.unique(compressed[..., 0])) > 200  # the ramp survives
