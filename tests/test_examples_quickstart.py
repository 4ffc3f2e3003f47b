"""examples/quickstart.py runs and agrees with torch over its whole session."""

import runpy
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_session_matches_torch(capsys):
    worst = runpy.run_path(str(EXAMPLE))["main"]()
    assert worst <= 1e-10
    assert "largest difference from torch" in capsys.readouterr().out
