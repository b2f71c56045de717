"""Tests that kill surviving mutants of the prune module (docs/testing.md "Mutation testing")."""
