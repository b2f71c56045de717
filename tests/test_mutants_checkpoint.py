"""Tests that kill surviving mutants of the checkpoint module (docs/testing.md "Mutation testing")."""
