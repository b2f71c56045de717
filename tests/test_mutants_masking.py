"""Tests that kill surviving mutants of the masking module (docs/testing.md "Mutation testing")."""
