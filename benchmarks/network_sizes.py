"""Network overrides shared by the benchmark scripts (``--network tiny``: a smoke-test size, not a measured one).

The sizes are ``configs/tiny.json``, the preset the tests use too.
"""

import json
from pathlib import Path

TINY_NETWORK = json.loads((Path(__file__).resolve().parents[1] / "configs" / "tiny.json").read_text())
