"""Tests that kill surviving mutants of the student module (docs/testing.md "Mutation testing")."""
