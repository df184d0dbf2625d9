"""Operator tooling: the `mdp` command line and the local supervisor."""
