#!/usr/bin/env bash
# Placeholder until the demo lands: fails loudly rather than pretending.
echo "demo: not implemented yet (scripts/demo.sh)" >&2
exit 1
