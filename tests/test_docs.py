"""The docs state facts the code computes: keep them from going stale, and keep them self-contained."""

import re
from pathlib import Path

from jaxbn.testing import behaviour

ROOT = Path(__file__).resolve().parents[1]


def test_semantics_table_is_the_live_table():
    doc = (ROOT / "docs" / "semantics.md").read_text()
    block = re.search(r"<!-- behaviour-table:start -->\n```\n(.*?)\n```\n<!-- behaviour-table:end -->", doc, re.S)
    assert block, "docs/semantics.md lost its behaviour-table markers"
    live = behaviour.format_table(behaviour.behaviour_table(with_torch=False))
    assert block.group(1).strip() == live.strip()


def test_docs_and_package_name_no_file_outside_the_repository():
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "jaxbn").rglob("*.py")]
    offenders = [str(f.relative_to(ROOT)) for f in files
                 if re.search(r"DESIGN\.md|\bshared/", f.read_text(encoding="utf-8"))]
    assert not offenders


def test_relative_links_in_the_docs_resolve():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        prose = re.sub(r"```.*?```|`[^`\n]*`", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_the_tests_the_docs_cite_exist():
    """Every ``tests/<path>.py`` cited is a file, every ``tests/<path>.py::<name>`` a test in that
    file, every other `` `test_<name>` `` a test somewhere under tests/, and no test file is cited
    by its bare name (tests move; the docs must follow)."""
    cited_in = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / ".ci" / "run", *(ROOT / "docs").glob("*.md"),
                *(f for d in ("benchmarks", "jaxbn", "examples") for f in (ROOT / d).rglob("*")
                  if f.suffix in {".py", ".md", ".sh"})]
    defined = {name for f in (ROOT / "tests").rglob("*.py")
               for name in re.findall(r"^def (test_\w+)\(", f.read_text(encoding="utf-8"), re.M)}
    for doc in cited_in:
        text = doc.read_text(encoding="utf-8")
        where = doc.relative_to(ROOT)
        for path, name in re.findall(r"\b(tests/[\w/]+\.py)(?:::(\w+))?", text):
            assert (ROOT / path).is_file(), f"{where} cites {path}, which does not exist"
            if name:
                source = (ROOT / path).read_text(encoding="utf-8")
                assert re.search(rf"^def {name}\(", source, re.M), f"{where} cites {path}::{name}"
        for name in re.findall(r"`(test_\w+)`", text):
            assert name in defined, f"{where} cites {name}, which no test file defines"
        bare = re.findall(r"(?<![/\w])test_\w+\.py", text)
        assert not bare, f"{where} cites {bare} without its folder: write tests/<folder>/<file>"


def test_performance_doc_holds_the_step_tables_with_machine_and_date():
    """``benchmarks/step.py --doc`` rewrites these blocks; each starts with where and when."""
    doc = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    for kind in ("step-cpu", "step-gpu"):
        block = re.search(rf"<!-- benchmark-{kind}:start -->\n(.*?)<!-- benchmark-{kind}:end -->", doc, re.S)
        assert block, f"docs/performance.md lost its benchmark-{kind} markers"
        assert re.match(r"Measured \d{4}-\d\d-\d\d .* on ", block.group(1)), kind


def test_no_file_cites_the_retired_lab_notebook():
    """docs/performance.md replaced the benchmarks' lab notebook: code gives its reason in a line,
    docs link to docs/performance.md."""
    folders = ("jaxbn", "benchmarks", "tests", "examples", "docs")
    files = [ROOT / "README.md", *(f for d in folders for f in (ROOT / d).rglob("*")
                                   if f.suffix in {".py", ".md", ".sh"})]
    offenders = [str(f.relative_to(ROOT)) for f in files
                 if re.search(r"N[O]TES\b", f.read_text(encoding="utf-8"))]
    assert not offenders
