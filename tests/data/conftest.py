"""Fixtures for the data tests: the golden tokenizer and makers of good and deliberately bad images."""

from __future__ import annotations

import json

import pytest

import image_makers


@pytest.fixture(scope="session")
def tokenizer(golden_dir):
    from nextstep_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(golden_dir / "tokenizer")


@pytest.fixture(scope="session")
def golden_special_ids(golden_dir) -> dict[str, int]:
    return json.loads((golden_dir / "meta.json").read_text())["special_token_ids"]


@pytest.fixture(scope="session")
def images():
    """Makers of encoded test images (tests/image_makers.py)."""
    return image_makers
