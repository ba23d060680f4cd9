"""The llama.cpp engine's image plumbing without a model: where the projector is found, how a
conversation's image parts become mtmd's markers, and how a cached prefix is cut at an image."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from llmrelay.worker.engines.base import EngineError
from llmrelay.worker.engines.llamacpp.options import projector
from llmrelay.worker.engines.llamacpp.vision import MARKER, ImageSpan, Prompt, image_ids, marked


def test_the_projector_is_found_next_to_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.Q4_0.gguf"
    model.write_bytes(b"")
    assert projector(argparse.Namespace(mmproj=None), model) is None
    (tmp_path / "mmproj-model-f16.gguf").write_bytes(b"")
    (tmp_path / "mmproj-model-q8.gguf").write_bytes(b"")
    assert projector(argparse.Namespace(mmproj=None), model) == tmp_path / "mmproj-model-f16.gguf"
    given = tmp_path / "other.gguf"
    given.write_bytes(b"")
    assert projector(argparse.Namespace(mmproj=str(given)), model) == given
    with pytest.raises(EngineError, match="--mmproj: no such file"):
        projector(argparse.Namespace(mmproj=str(tmp_path / "missing.gguf")), model)


def test_image_parts_become_markers_in_place() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "data": "", "mime": "image/png"},
                                             {"type": "text", "text": "What is this?"},
                                             {"type": "image", "data": "", "mime": "image/png"}]}]
    assert marked(messages) == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": f"{MARKER}\nWhat is this?\n{MARKER}"}]


def test_image_ids_key_an_image_by_its_content() -> None:
    assert image_ids(b"red", 4) == image_ids(b"red", 4)
    assert image_ids(b"red", 4)[0] != image_ids(b"blue", 4)[0]
    assert all(t < 0 for t in image_ids(b"red", 4)) and len(set(image_ids(b"red", 4))) == 4


def test_a_cached_prefix_ends_before_an_image_it_would_cut() -> None:
    prompt = Prompt(list(range(5)) + image_ids(b"x", 4) + [7, 8], [ImageSpan(5, 4, None)])
    assert [prompt.reusable(n) for n in (3, 5, 6, 8, 9, 10)] == [3, 5, 5, 5, 9, 10]
    assert prompt.text_until(0) == 5 and prompt.text_until(9) == 11
    assert prompt.image_at(5) is prompt.images[0] and prompt.image_at(6) is None
