"""Deterministic simulation of the 2PC protocol: one seed, one trace (docs/design.md §10.2)."""
