"""Small random models of each family saved by transformers (float32), loaded quantized by both libraries."""

import pytest

from parity import model_pair
from quantized import FAMILIES, SIZES

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (test extra)")


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """family -> a folder holding that family's random model as transformers saves it."""
    folders = {}

    def get(family: str):
        if family not in folders:
            ref, _ = model_pair(family, **SIZES, **FAMILIES[family])
            folders[family] = tmp_path_factory.mktemp(family)
            ref.save_pretrained(folders[family])
        return folders[family]

    return get
