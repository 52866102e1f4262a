"""The daemon package keeps its rooms: no import cycles (imports inside
functions included), files and classes small enough to read in one sitting,
a docstring on every class, and no module reaching into another's privates."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "lockd_src" / "lockd"
MODULES = {p.stem: p for p in sorted(PKG.glob("*.py"))}
MAX_FILE_LINES = 450
MAX_CLASS_LINES = 250
# A byte copy of plugins/module_utils/_lockd_admin.py (tested elsewhere): its
# shape is the Ansible side's.
COPIES = {"adminclient"}


def tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def local_imports(name: str) -> dict:
    """{imported lockd module: [line numbers]}, from every import statement
    anywhere in the module (inside functions too)."""
    out: dict = {}
    for node in ast.walk(tree(name)):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:        # from . import x, y
                targets = [a.name for a in node.names]
            elif node.level == 1:                              # from .x import y
                targets = [node.module.split(".")[0]]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "lockd":
                parts = node.module.split(".")
                targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("lockd.")]
        for t in targets:
            if t in MODULES and t != name:
                out.setdefault(t, []).append(node.lineno)
    return out


def find_cycle(graph: dict):
    state: dict = {}
    stack: list = []

    def visit(n):
        state[n] = "active"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "active":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = {name: set(local_imports(name)) for name in MODULES}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_bottom_layers_import_nothing_above_them():
    # xdr -> rpc -> protocol -> lockspace: the wire and the lock table never
    # know about connections, the daemon or its state
    above = {"server", "program", "state", "daemon", "admin", "handover", "recovery", "owners", "loop"}
    for low in ("xdr", "rpc", "protocol", "filelock", "lockspace", "journal", "systemd", "config"):
        assert not set(local_imports(low)) & above, (low, local_imports(low))


@pytest.mark.parametrize("name", sorted(set(MODULES) - COPIES))
def test_file_is_small_enough(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{name}.py has {lines} lines (over {MAX_FILE_LINES}): two concepts?"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_classes_are_small_and_documented(name):
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name} is {size} lines"
            assert ast.get_docstring(node), f"{name}.{node.name} has no docstring"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_of_other_modules(name):
    t = tree(name)
    aliases = {}
    for node in ast.walk(t):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                if node.module is None:
                    aliases[a.asname or a.name] = a.name
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    pytest.fail(f"{name}.py line {node.lineno} imports private {node.module}.{a.name}")
    for node in ast.walk(t):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"{name}.py line {node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
