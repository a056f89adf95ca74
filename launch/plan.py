"""Run :mod:`mythos.tools.plan` from a checkout without installing (installed: ``mythos-plan``).

The code lives in the package so the console command needs no ``sys.path`` edit; this file only
makes the checkout importable and re-exports the module's names (tests and scripts load it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mythos.tools.plan import *  # noqa: E402, F403
from mythos.tools.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
