import os

import pytest
from hypothesis import settings
from tiny_pipelines import TinyModels
from tiny_sd import build_tiny_sd

settings.register_profile("ltg", deadline=None, max_examples=int(os.environ.get("LTG_EXAMPLES", 30)), print_blob=True)
settings.load_profile("ltg")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random SD-1.x-shaped pipeline saved with save_pretrained, to load as users load SD 1.4."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random pipelines of each family (and TAESD-style decoders), each built on first use."""
    return TinyModels(tmp_path_factory.mktemp("tiny_pipelines"))
