"""Shared fixtures: tiny PEFT-made adapters (session-scoped) and the example base model."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.support.fixtures import Fixtures, build_fixtures

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """Every fixture base model and adapter, written by PEFT into a session tmp folder."""
    return build_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def example_base():
    """The bundled example's base model folder (SmolLM2-135M-Instruct), prepared once and cached."""
    from merging.base.example_model import example_base_model

    return example_base_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is ~100× faster than two spinning against other work on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_noise() -> torch.Tensor:
    """The tiny SD UNet's noise prediction without adapters (tests/support/sdparts.py)."""
    from tests.support import sdparts

    return sdparts.noise(sdparts.unet())
