"""Kill tests for mutants of pretrain/student.py (docs/testing.md "Mutation testing"): the layer maps
(``resolve_layer_map``, ``teacher_layer_map``, ``cadence_layer_map``), ``StudentConfig``'s checks and
``freeze_unused``. Expected maps are worked out by hand in the comments (or against an independent brute-force
reference of the documented rule); config errors are compared as whole messages, so the key they name is checked too.
Pure Python except two tiny transformers configs and three small module trees named as BERT's parameters: no model is
built.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pretrain.schema import ConfigError
from pretrain.student import (
    StudentConfig,
    cadence_layer_map,
    freeze_unused,
    resolve_layer_map,
    teacher_layer_map,
)

F, S = "full_attention", "sliding_attention"
# ModernBERT's 12 layers with a global (full) layer every 3: F S S F S S F S S F S S
MODERNBERT_12 = [F, S, S] * 4


def kinds(pattern: str) -> list[str]:
    """The kinds of a pattern: "FSS" -> [F, S, S]; any other letter is a third kind."""
    return [{"F": F, "S": S}.get(c, c) for c in pattern]


# ------------------------------------------------------------------------------------------------------------------
# cadence_layer_map


def reference_cadence(ks: list[str]) -> list[int]:
    """The documented rule by brute force: among every increasing map whose student layer i has kind ks[i], fix
    student layer i (i = 0, 1, ...) to the choice nearest ``i * (N - 1) / (M - 1)`` (``N - 1`` for M = 1; ties: the
    lower) among the maps that agree with the layers already fixed."""
    n = len(ks)
    m = max(1, n // 2)
    maps = [c for c in itertools.combinations(range(n), m) if all(ks[c[i]] == ks[i] for i in range(m))]
    fixed: tuple[int, ...] = ()
    for i in range(m):
        ideal = n - 1 if m == 1 else i * (n - 1) / (m - 1)
        options = {c[i] for c in maps if c[:i] == fixed}
        fixed += (min(options, key=lambda j: (abs(j - ideal), j)),)
    return list(fixed)


def test_cadence_map_of_modernbert_12_layers():
    # N = 12, M = 6; student kinds F S S F S S; ideal positions 0, 2.2, 4.4, 6.6, 8.8, 11:
    # 0 (F); S nearest 2.2 after 0 -> 2; S nearest 4.4 -> 4; F among 6, 9 nearest 6.6 -> 6; S nearest 8.8 -> 8;
    # S among 10, 11 -> 11
    assert cadence_layer_map(MODERNBERT_12) == [0, 2, 4, 6, 8, 11]


def test_cadence_map_of_global_every_other_layer():
    # N = 8, M = 4; student kinds F S F S; ideal 0, 2.33, 4.67, 7: 0; S 1 or 3 (leaving F S after) -> 3;
    # F 4 or 6 (leaving an S after) -> 4, adjacent to 3; S -> 7
    assert cadence_layer_map(kinds("FSFSFSFS")) == [0, 3, 4, 7]


def test_cadence_map_of_one_student_layer_is_the_last_of_its_kind():
    # N = 2 or 3: M = 1, ideal N - 1: layer 0's kind, the one nearest the last layer
    assert cadence_layer_map(kinds("FS")) == [0]
    assert cadence_layer_map(kinds("FSF")) == [2]


def test_cadence_map_when_the_kinds_force_the_choice():
    # FSSS: M = 2, kinds F S, ideal 0, 3 -> [0, 3]
    assert cadence_layer_map(kinds("FSSS")) == [0, 3]
    # FFFS: kinds F F, ideal 0, 3: the second F among 1, 2 -> 2
    assert cadence_layer_map(kinds("FFFS")) == [0, 2]
    # FFSS: the only F after 0 is 1
    assert cadence_layer_map(kinds("FFSS")) == [0, 1]
    # FFFSSS: M = 3, kinds F F F: the three Fs, whatever the ideal positions (0, 2.5, 5)
    assert cadence_layer_map(kinds("FFFSSS")) == [0, 1, 2]
    # SFFSSF: kinds S F F, ideal 0, 2.5, 5: 0; F 1 or 2 (5 leaves no F) -> 2 (0.5 away); then 5
    assert cadence_layer_map(kinds("SFFSSF")) == [0, 2, 5]


def test_cadence_map_never_goes_back():
    # N = 10, M = 5; kinds F F F S S; ideal 0, 2.25, 4.5, 6.75, 9: 0; F nearest 2.25 leaving F S S -> 2;
    # F after 2: only 7 (2 would be 2.5 away too, but it is taken); S -> 8; S -> 9
    assert cadence_layer_map(kinds("FFFSSSSFSS")) == [0, 2, 7, 8, 9]


def test_cadence_map_matches_the_brute_force_reference():
    patterns = ["".join(p) for n in range(2, 9) for p in itertools.product("FS", repeat=n)]
    patterns += ["".join(p) for p in itertools.product("FSG", repeat=6)]
    checked = 0
    for p in patterns:
        if len(set(p)) > 1:
            assert cadence_layer_map(kinds(p)) == reference_cadence(kinds(p)), p
            checked += 1
    assert checked > 900


# ------------------------------------------------------------------------------------------------------------------
# resolve_layer_map / teacher_layer_map


def test_layer_kinds_matter_for_cadence_only():
    assert resolve_layer_map("distilbert", 12, MODERNBERT_12) == [0, 2, 4, 7, 9, 11]
    assert resolve_layer_map("every_other", 12, MODERNBERT_12) == [0, 2, 4, 6, 8, 10]
    assert resolve_layer_map([1, 3], 12, MODERNBERT_12) == [1, 3]
    assert resolve_layer_map("cadence", 12, MODERNBERT_12) == [0, 2, 4, 6, 8, 11]
    assert resolve_layer_map("cadence", 8, kinds("FSFSFSFS")) == [0, 3, 4, 7]


def test_cadence_without_different_kinds_is_distilbert():
    assert resolve_layer_map("cadence", 12) == [0, 2, 4, 7, 9, 11]
    assert resolve_layer_map("cadence", 12, None) == [0, 2, 4, 7, 9, 11]
    # N = 6: M = 3, positions 0, 2.5, 5: "distilbert" rounds 2.5 up (floor(x + 0.5)) -> [0, 3, 5]; the cadence rule
    # would take the lower of a tie (2), so all-alike kinds must not go through it
    assert resolve_layer_map("cadence", 6, [F] * 6) == [0, 3, 5]
    assert resolve_layer_map("distilbert", 6) == [0, 3, 5]


def layer_map_error(spec, n: int = 12) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_layer_map(spec, n)
    return str(err.value)


def test_layer_list_errors_name_the_key():
    assert layer_map_error([]) == "student.layers: the list is empty; give at least one teacher layer index"
    assert layer_map_error([0, 12]) == "student.layers: [12] out of range: the teacher has 12 layers (indices 0..11)"
    assert layer_map_error([0, 4], n=4) == "student.layers: [4] out of range: the teacher has 4 layers (indices 0..3)"
    assert resolve_layer_map([0, 11], 12) == [0, 11]
    assert layer_map_error([3, 1]) == (
        "student.layers: [3, 1] must be strictly increasing (a student keeps the teacher's layer order, each layer "
        "once)"
    )
    assert layer_map_error([1, 1]) == (
        "student.layers: [1, 1] must be strictly increasing (a student keeps the teacher's layer order, each layer "
        "once)"
    )


def test_teacher_layer_map_reads_the_family_layer_kinds():
    from transformers import BertConfig, ModernBertConfig

    modernbert = ModernBertConfig(num_hidden_layers=12, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    assert modernbert.layer_types == MODERNBERT_12  # the default cadence: a global layer every 3
    assert teacher_layer_map("cadence", modernbert) == [0, 2, 4, 6, 8, 11]
    assert teacher_layer_map("distilbert", modernbert) == [0, 2, 4, 7, 9, 11]
    assert teacher_layer_map("cadence", BertConfig(num_hidden_layers=12)) == [0, 2, 4, 7, 9, 11]


# ------------------------------------------------------------------------------------------------------------------
# StudentConfig.validate


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        StudentConfig(**kwargs).validate()
    return str(err.value)


def test_valid_configs_pass():
    StudentConfig().validate()
    StudentConfig(architecture="distilbert").validate()
    StudentConfig(calibration_sequences=1).validate()
    StudentConfig(layers=[0], init="random", num_hidden_layers=1, hidden_size=1, num_attention_heads=1).validate()
    StudentConfig(init="random", hidden_size=64, num_attention_heads=4, intermediate_size=1).validate()
    StudentConfig(init="prune", hidden_size=64, num_attention_heads=4).validate()


def test_architecture_init_and_calibration_errors():
    assert config_error(architecture="bogus") == "student.architecture: 'bogus' is not one of ['same', 'distilbert']"
    assert config_error(init="bogus") == "student.init: 'bogus' is not one of ['teacher', 'random', 'prune']"
    assert config_error(calibration_sequences=0) == "student.calibration_sequences: 0 must be a positive integer"


def test_heads_must_divide_hidden_size():
    assert config_error(init="random", hidden_size=64, num_attention_heads=5) == (
        "student.num_attention_heads: 5 does not divide student.hidden_size=64"
    )


def test_layers_errors():
    assert config_error(layers="bogus") == (
        "student.layers: 'bogus' is not one of ['every_other', 'distilbert', 'cadence'] or a list of teacher layer "
        "indices"
    )
    assert config_error(layers=[]) == "student.layers: the list is empty; give at least one teacher layer index"
    for bad in ([-1], [True], [1.5], [0, -1]):
        assert config_error(layers=bad) == (
            f"student.layers: {bad!r}: indices must be non-negative integers (0 = first layer)"
        )
    assert config_error(layers=[1, 1]) == (
        "student.layers: [1, 1] repeats a layer; list each teacher layer at most once"
    )


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"])
def test_sizes_must_be_positive_integers(key):
    assert config_error(init="random", **{key: 0}) == f"student.{key}: 0 must be a positive integer"
    assert config_error(init="random", **{key: -2}) == f"student.{key}: -2 must be a positive integer"
    assert config_error(init="random", **{key: "8"}) == f"student.{key}: '8' must be a positive integer"
    cfg = StudentConfig(init="random")
    setattr(cfg, key, 1)
    cfg.validate()


def test_prune_errors():
    assert config_error(init="prune", num_hidden_layers=2) == (
        "student.num_hidden_layers: 2: with student.init='prune' the depth is the layer map's; choose the teacher "
        "layers with student.layers"
    )
    assert config_error(init="prune", architecture="distilbert") == (
        "student.architecture: 'distilbert': student.init='prune' keeps the teacher's class; use 'same'"
    )


# ------------------------------------------------------------------------------------------------------------------
# freeze_unused


# parameter names as BertModel / BertForPreTraining / BertForMaskedLM name them (one layer; a few of each part)
BERT_MODEL = [
    "embeddings.word_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.output.dense.bias",
    "pooler.dense.weight",
    "pooler.dense.bias",
]
BERT_PRETRAINING = ["bert." + n for n in BERT_MODEL] + [
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.seq_relationship.weight",
]
BERT_MLM = ["bert." + n for n in BERT_MODEL if not n.startswith("pooler.")] + ["cls.predictions.bias"]


def module_with(names: list[str]) -> nn.Module:
    """A module tree whose ``named_parameters()`` are ``names``, in that order (one-element tensors)."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(1)))
    assert [n for n, _ in root.named_parameters()] == names
    return root


@pytest.mark.parametrize(
    ("names", "pooler"),
    [
        (BERT_MODEL, ["pooler.dense.weight", "pooler.dense.bias"]),  # the pooler at the top
        (BERT_PRETRAINING, ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]),  # inside the base model
        (BERT_MLM, []),  # no pooler
    ],
    ids=["top_level_pooler", "nested_pooler", "no_pooler"],
)
def test_freeze_unused_freezes_the_pooler_only(names, pooler):
    model = module_with(names)
    assert freeze_unused(model) == pooler
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n in names if n not in pooler]
    assert len(trainable) >= 4
