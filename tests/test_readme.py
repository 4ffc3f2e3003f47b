"""The README's two set-up commands are exactly what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
    return re.findall(r"^(python3\.11 -m venv \.venv && .+)$", text, flags=re.MULTILINE)


def test_ci_runs_the_readme_commands_verbatim():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2, readme
    assert readme == ci
    assert readme[0].endswith("python -m jaxbn")
    assert readme[1].endswith("python -m pytest")
    assert all("torch==2.13.0" in c for c in readme)


def test_readme_says_how_to_run_the_fast_subset():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r'python -m pytest -m "not slow"', readme)
    assert '"slow:' in (ROOT / "pyproject.toml").read_text()  # the marker the command deselects
