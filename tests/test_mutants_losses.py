"""Tests that kill surviving mutants of the losses module (docs/testing.md "Mutation testing")."""
