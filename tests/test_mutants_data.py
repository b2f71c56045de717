"""Tests that kill surviving mutants of the data module (docs/testing.md "Mutation testing")."""
