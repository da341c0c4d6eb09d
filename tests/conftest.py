import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory):
    from tiny import write_text

    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")
