"""Constants the Ansible side and the docs repeat agree with lockd's (the one source)."""
import ast
import re
from pathlib import Path

from lockd import admin, protocol as P

ROOT = Path(__file__).resolve().parents[2]


def module_constants(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def test_module_utils_constants():
    c = module_constants(ROOT / "plugins/module_utils/_lockd_admin.py")
    assert c["PROTOCOL_VERSION"] == admin.VERSION
    assert c["DEFAULT_ADMIN_SOCKET"] == P.ADMIN_SOCKET


def test_module_and_fragment_defaults():
    for f in ("plugins/modules/lease_info.py", "plugins/modules/lease.py", "plugins/doc_fragments/_lockd.py"):
        text = (ROOT / f).read_text()
        paths = set(re.findall(r"/run/libvirt/virtlockd[-\w]*", text))
        assert paths <= {P.ADMIN_SOCKET, P.LOCK_SOCKET}, (f, paths)


def test_documented_ops_are_the_served_ops():
    doc = (ROOT / "docs/admin-protocol.md").read_text()
    table = doc[doc.index("## Operations"):doc.index("### Filters")]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert documented == list(admin.OPS)


def test_units_use_protocol_paths():
    units = ROOT / "lockd_src/lockd/data/units"
    assert "ListenStream=%s\n" % P.LOCK_SOCKET in (units / "virtlockd.socket").read_text()
    assert "ListenStream=%s\n" % P.ADMIN_SOCKET in (units / "virtlockd-admin.socket").read_text()
