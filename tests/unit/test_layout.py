"""The tree keeps its rooms apart: product code never imports the test suite,
and nothing in the repository reads outside it (a fresh clone has nothing
beside it)."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("lockd_src", "plugins", "roles", "playbooks", "scripts", "bench", "testbed", "extensions")


def tracked(*dirs: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *dirs], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_product_code_never_imports_the_test_suite():
    offenders = {}
    for path in tracked(*PRODUCT_DIRS):
        if path.suffix == ".py":
            bad = sorted(m for m in imported_modules(path) if m == "tests" or m.startswith("tests."))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
        elif path.suffix in (".yml", ".yaml", ".sh", ".j2", ".cfg"):
            if re.search(r"-m[\"',\s]+tests\.|\btests\.harness\b", path.read_text(errors="replace")):
                offenders[str(path.relative_to(ROOT))] = ["runs a tests.* module"]
    assert not offenders, f"product code uses the test suite: {offenders}"


def test_nothing_reads_outside_the_repository():
    pattern = re.compile(r"\.\./shared|/work/shared|[\"']shared[\"']\s*/\s*[\"']spec[\"']|parents\[3\]")
    offenders = []
    for path in tracked("tests", "testbed", "scripts", "bench", "lockd_src", "plugins", "roles",
                        "extensions", "Makefile", ".ci"):
        if path.suffix in (".png", ".json", ".txt") or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "reads outside the repository:\n" + "\n".join(offenders)


def test_test_vectors_live_in_the_repository():
    trace = ROOT / "tests" / "data" / "virtlockd-wire-trace.txt"
    head = trace.read_text().splitlines()[:3]
    assert any("copied verbatim" in line for line in head), "the trace must say where it came from"
