"""The mutation check (tools/mutate.py) stays runnable: each planted bug's text occurs
exactly once in its file, so that a change to the code cannot silently retire a mutant."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from mutants import MUTANTS  # noqa: E402


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_to_the_current_code(mutant):
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.old) == 1, (
        f"{mutant.name}: its text occurs {source.count(mutant.old)} times in {mutant.path}; "
        "update tools/mutants.py with the code")
    assert (ROOT / mutant.tests[0]).exists()
