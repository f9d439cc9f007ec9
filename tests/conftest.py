import os

import pytest
import torch

os.environ.setdefault("TINYLORA_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tl"))

from tinylora.testing import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _svd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
