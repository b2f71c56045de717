"""Kill tests for mutants of pretrain/prune.py (docs/testing.md "Mutation testing"): none yet, its mutation run is
still to do; the file is in [tool.mutmut]'s test selection so that adding tests here needs no config change."""
