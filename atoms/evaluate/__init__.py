"""Judging unit sets: every metric defined once (``metrics``, ``threshold_counts``), ℓ1 recovery
(``recovery``), unit sets — neurons, features, atoms, random directions (``units``) — planted
atoms with known ground truth (``synthetic``), and the one evaluator that gives an SAE's metrics
and a unit set's result row (``evaluator``).

May import ``atoms.core``, ``atoms.aip`` and ``atoms.sae``.
"""
