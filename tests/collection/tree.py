"""Prepare the ansible_collections/lockd/virtlockd tree that ansible-test needs.

ansible-test only runs from inside ``ansible_collections/<ns>/<name>``, so
the collection's content is copied (not symlinked: the ``symlinks`` sanity test
rejects links that leave the collection) into ``<repo>/ansible_collections/``
(gitignored). The same tree is the ANSIBLE_COLLECTIONS_PATH of the module
tests. Run ``python -m tests.collection.tree`` to refresh it by hand.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS_ROOT = REPO                      # ANSIBLE_COLLECTIONS_PATH
TREE = REPO / "ansible_collections" / "lockd" / "virtlockd"

# What `ansible-galaxy collection build` ships (galaxy.yml build_ignore drops
# the rest): the Ansible content plus the bundled daemon package.
CONTENT = [
    "galaxy.yml", "README.md", ".ansible-lint", "meta", "plugins", "roles", "playbooks",
    "changelogs", "docs", "lockd_src",
]
IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist",
    ".plugin-cache.yaml",
)


def prepare() -> Path:
    """(Re)build the tree from the working copy; returns its path."""
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    for name in CONTENT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, TREE / name, ignore=IGNORE)
        elif src.exists():
            shutil.copy2(src, TREE / name)
    # The tree sits in the project's git work tree, where it is ignored, and
    # ansible-test lists content with git: without a repository of its own it
    # would see no files at all ("All targets skipped").
    (TREE / ".gitignore").write_text("/tests/output/\n")
    subprocess.run(["git", "init", "-q", str(TREE)], check=True)
    return TREE


if __name__ == "__main__":
    print(prepare())
    sys.exit(0)
