"""Print the requirements of pyproject.toml's optional-dependency groups named on the command line,
one per line (for `pip install -r`), so `make test` adds the test extras without rebuilding the package."""

import sys
import tomllib
from pathlib import Path

extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
for group in sys.argv[1:]:
    print("\n".join(extras[group]))
