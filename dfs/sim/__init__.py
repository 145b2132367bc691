"""Deterministic simulation of the 2PC protocol: one seed, one trace (DESIGN.md §10.2)."""
