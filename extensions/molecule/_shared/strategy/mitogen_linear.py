"""Mitogen's ``linear`` strategy, for scenarios whose hosts are slow to start
Python (the NFS test bed's QEMU guests under TCG emulation: 3-6 s per module
run over plain ssh). Mitogen keeps one interpreter per host and runs every
module in it: the role's converge on two guests takes ~2.6x less time
(measured, extensions/molecule/README.md). Only the NFS scenarios use it;
every other scenario runs plain Ansible, so the role is proven without it.

A shim: Ansible loads strategies from a directory (``ANSIBLE_STRATEGY_PLUGINS``),
and mitogen's own file lives inside the venv's site-packages.
"""
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
