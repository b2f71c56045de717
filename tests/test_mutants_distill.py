"""Tests that kill surviving mutants of the distill module (docs/testing.md "Mutation testing")."""
