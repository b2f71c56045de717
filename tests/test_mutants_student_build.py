"""Kill tests for mutants of pretrain/student.py's builders (docs/testing.md "Mutation testing"; the table of
docs/mutants-student-b.md): the student's config fields, copied tensors, attention kernel, pooler and record, for
every init and architecture, against values written here from the teacher.

The teachers are tiny (width 32, 4 layers, vocabulary 99) and built once per module from transformers' config classes,
so the file needs no tokenizer. ``odd`` sets every field a student inherits to a value other than the library's
default (pad id 3, dropouts 0.2 / 0.3, relu, initializer range 0.05, untied decoder, layer_norm_eps 1e-5, eager
attention), so that a field dropped on the way shows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pretrain.student as student_mod
from pretrain.schema import ConfigError
from pretrain.student import StudentConfig, build_student

VOCAB = 99
FOLD_NOTE = "token_type_embeddings[0] folded into position_embeddings (DistilBERT has no token types)"
POOLER_NOTE = "teacher pooler dropped (DistilBERT has none)"
EPS_NOTE = "teacher layer_norm_eps=1e-05, DistilBERT uses 1e-12: outputs differ slightly"
ODD = {
    "pad_token_id": 3,
    "hidden_dropout_prob": 0.2,
    "attention_probs_dropout_prob": 0.3,
    "hidden_act": "relu",
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
    "layer_norm_eps": 1e-5,
    "attn_implementation": "eager",
}


def bert_config(**overrides):
    from transformers import BertConfig

    sizes = {"num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
    return BertConfig(vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64, **{**sizes, **overrides})


def seeded(cls, config, **kwargs):
    torch.manual_seed(0)
    return cls(config, **kwargs).eval()


@pytest.fixture(scope="module")
def odd():
    """BertForMaskedLM whose every inherited config field differs from the library default (:data:`ODD`)."""
    from transformers import BertForMaskedLM

    return seeded(BertForMaskedLM, bert_config(**ODD))


@pytest.fixture(scope="module")
def plain():
    """BertForMaskedLM with the library's defaults (SDPA, layer_norm_eps 1e-12; no pooler)."""
    from transformers import BertForMaskedLM

    return seeded(BertForMaskedLM, bert_config())


@pytest.fixture(scope="module")
def pooled():
    """BertModel with its pooler."""
    from transformers import BertModel

    return seeded(BertModel, bert_config(), add_pooling_layer=True)


@pytest.fixture(scope="module")
def bare():
    """BertModel without pooler (a sentence encoder's checkpoint)."""
    from transformers import BertModel

    return seeded(BertModel, bert_config(), add_pooling_layer=False)


@pytest.fixture(scope="module")
def modernbert():
    """ModernBertForMaskedLM of 6 layers, a global layer every 3 (full, sliding, sliding, full, sliding, sliding)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    cfg = ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"] * 2,
        local_attention=16,
        pad_token_id=0,
        cls_token_id=2,
        sep_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
    )
    return seeded(ModernBertForMaskedLM, cfg)


def electra(cls, embedding: int):
    from transformers import ElectraConfig

    cfg = ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=embedding,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return seeded(cls, cfg)


def assert_distilbert_copy(student, teacher, record, s_prefix: str, t_prefix: str) -> None:
    """The DistilBERT student's embeddings equal the teacher's (positions + type-0 token type), layer 0 its map[0]."""
    s, t = student.state_dict(), teacher.state_dict()
    e = f"{t_prefix}embeddings."
    assert torch.equal(s[f"{s_prefix}embeddings.word_embeddings.weight"], t[e + "word_embeddings.weight"])
    fold = t[e + "position_embeddings.weight"] + t[e + "token_type_embeddings.weight"][0]
    assert torch.equal(s[f"{s_prefix}embeddings.position_embeddings.weight"], fold)
    t_q = t[f"{t_prefix}encoder.layer.{record['layer_map'][0]}.attention.self.query.weight"]
    assert torch.equal(s[f"{s_prefix}transformer.layer.0.attention.q_lin.weight"], t_q)


# -------------------------------------------------------------------------------------------- architecture="distilbert"
def test_distilbert_student_takes_every_config_field_from_the_teacher(odd):
    """DistilBertConfig of a BERT teacher: sizes, dropouts, activation, init range, pad id, untied decoder, learned
    positions, the teacher's (eager) kernel; the record and the notes (the teacher's layer_norm_eps is not 1e-12)."""
    student, record = build_student(odd, StudentConfig(layers=[0, 3], architecture="distilbert"))
    c = student.config
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert (c.vocab_size, c.max_position_embeddings, c.sinusoidal_pos_embds) == (VOCAB, 64, False)
    assert (c.n_layers, c.n_heads, c.dim, c.hidden_dim) == (2, 4, 32, 64)
    assert (c.dropout, c.attention_dropout, c.activation, c.initializer_range) == (0.2, 0.3, "relu", 0.05)
    assert (c.pad_token_id, c.tie_word_embeddings, c._attn_implementation) == (3, False, "eager")
    assert student.get_submodule("distilbert.embeddings.word_embeddings").padding_idx == 3
    assert_distilbert_copy(student, odd, record, "distilbert.", "bert.")
    s, t = student.state_dict(), odd.state_dict()
    assert torch.equal(s["vocab_projector.weight"], t["cls.predictions.decoder.weight"])  # untied: its own tensor
    assert not torch.equal(s["vocab_projector.weight"], s["distilbert.embeddings.word_embeddings.weight"])
    assert record["architecture"] == "distilbert" and record["init"] == "teacher"
    assert record["teacher_class"] == "BertForMaskedLM" and record["student_class"] == "DistilBertForMaskedLM"
    assert record["initialized"] == [] and record["notes"] == [FOLD_NOTE, EPS_NOTE]


def test_distilbert_notes_of_a_default_bert(plain):
    """layer_norm_eps 1e-12 and no pooler: the fold is the only note."""
    student, record = build_student(plain, StudentConfig(layers=[0, 2], architecture="distilbert"))
    assert record["notes"] == [FOLD_NOTE]
    assert student.config._attn_implementation == "sdpa"


def test_distilbert_notes_name_a_dropped_pooler(pooled):
    student, record = build_student(pooled, StudentConfig(layers=[1, 3], architecture="distilbert"))
    assert type(student).__name__ == "DistilBertModel" and record["notes"] == [FOLD_NOTE, POOLER_NOTE]
    assert_distilbert_copy(student, pooled, record, "", "")


def test_distilbert_from_an_electra_discriminator():
    """ELECTRA with embedding_size = hidden_size is BERT-shaped; its encoder has no ``pooler`` attribute at all."""
    from transformers import ElectraModel

    teacher = electra(ElectraModel, 32)
    assert not hasattr(teacher, "pooler")
    student, record = build_student(teacher, StudentConfig(layers=[0, 2], architecture="distilbert"))
    assert type(student).__name__ == "DistilBertModel" and record["notes"] == [FOLD_NOTE]
    assert_distilbert_copy(student, teacher, record, "", "")


def _roberta(mlm: bool):
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        type_vocab_size=1,
    )
    return seeded(RobertaForMaskedLM, cfg) if mlm else seeded(RobertaModel, cfg, add_pooling_layer=False)


def _bert_without(part: str):
    """A BERT whose encoder lacks ``part`` of its embeddings (``""``: no embeddings module at all)."""
    from transformers import BertModel

    teacher = seeded(BertModel, bert_config(), add_pooling_layer=False)
    if part:
        delattr(teacher.embeddings, part)
    else:
        del teacher.embeddings
    return teacher


def _bert_relative():
    from transformers import BertForMaskedLM

    teacher = seeded(BertForMaskedLM, bert_config())
    teacher.config.position_embedding_type = "relative_key"
    return teacher


NOT_BERT_SHAPED = {
    "roberta-mlm": lambda: _roberta(True),  # offset positions (create_position_ids_from_input_ids)
    "roberta-bare": lambda: _roberta(False),
    "electra-generator": lambda: electra(__import__("transformers").ElectraForMaskedLM, 16),  # embeddings_project
    "bert-relative-positions": _bert_relative,
    "bert-no-token-types": lambda: _bert_without("token_type_embeddings"),
    "bert-no-embeddings": lambda: _bert_without(""),
}


@pytest.mark.parametrize("name", list(NOT_BERT_SHAPED))
def test_distilbert_refuses_a_teacher_that_is_not_bert_shaped(name):
    """The embeddings check itself refuses (its message), before any tensor is copied."""
    with pytest.raises(ConfigError, match=r"student\.architecture: 'distilbert' needs a BERT teacher"):
        build_student(NOT_BERT_SHAPED[name](), StudentConfig(layers=[0, 2], architecture="distilbert"))


def test_distilbert_refuses_a_head_without_bert_layout_naming_the_teacher_class(plain):
    teacher = copy.deepcopy(plain)
    teacher.cls.predictions.transform = nn.Identity()
    with pytest.raises(ConfigError, match=r"needs BERT's MLM head \(cls.predictions\); BertForMaskedLM has another"):
        build_student(teacher, StudentConfig(layers=[0, 2], architecture="distilbert"))


def test_distilbert_refuses_an_electra_generator_whose_head_is_two_sibling_modules():
    """ElectraForMaskedLM with embedding_size = hidden_size passes the embeddings check; its MLM head
    (generator_predictions + generator_lm_head) has no module name of its own: the ConfigError, not a KeyError."""
    from transformers import ElectraForMaskedLM

    with pytest.raises(ConfigError, match=r"needs BERT's MLM head \(cls.predictions\); ElectraForMaskedLM has another"):
        build_student(electra(ElectraForMaskedLM, 32), StudentConfig(layers=[0, 2], architecture="distilbert"))


def test_distilbert_conversion_refuses_unmapped_and_misnamed_tensors(plain, monkeypatch):
    """Its guards: a student tensor left unmapped is named (ValueError); a misnamed one fails the strict load."""
    cfg = StudentConfig(layers=[0, 2], architecture="distilbert")
    real_head = student_mod._copy_distilbert_head
    with monkeypatch.context() as m:
        m.setattr(student_mod, "_copy_distilbert_head", lambda c, h, cls: None)
        with pytest.raises(ValueError, match=r"left tensors unmapped: \['vocab_layer_norm.bias'"):
            build_student(plain, cfg)

    def head_and_a_typo(c, h, cls):
        real_head(c, h, cls)
        c.put("vocab_projector.weights", h + "decoder.weight")

    monkeypatch.setattr(student_mod, "_copy_distilbert_head", head_and_a_typo)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "vocab_projector.weights"'):
        build_student(plain, cfg)


# ------------------------------------------------------------------------------------------------ architecture="same"
def test_same_student_keeps_the_teachers_kernel_and_fields(odd):
    """Same class, every tensor copied from its mapped layer; the eager kernel and the odd fields carried over."""
    student, record = build_student(odd, StudentConfig(layers=[1, 3]))
    assert type(student).__name__ == "BertForMaskedLM" and student.config._attn_implementation == "eager"
    assert (student.config.hidden_act, student.config.pad_token_id, student.config.layer_norm_eps) == ("relu", 3, 1e-5)
    s, t = student.state_dict(), odd.state_dict()
    assert torch.equal(s["bert.encoder.layer.0.output.dense.weight"], t["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(s["cls.predictions.decoder.weight"], t["cls.predictions.decoder.weight"])
    assert (
        record["copied"]["bert.encoder.layer.1.attention.self.query.bias"]
        == "bert.encoder.layer.3.attention.self.query.bias"
    )
    assert record["initialized"] == [] and record["notes"] == []
    assert record["architecture"] == "same" and record["init"] == "teacher"
    assert record["teacher_class"] == record["student_class"] == "BertForMaskedLM"


def test_same_student_keeps_the_teachers_pooler(pooled):
    student, _ = build_student(pooled, StudentConfig(layers=[0, 2]))
    assert student.pooler is not None
    assert torch.equal(student.state_dict()["pooler.dense.weight"], pooled.state_dict()["pooler.dense.weight"])


def test_same_student_refuses_a_teacher_whose_config_does_not_fit_its_weights(plain):
    """A tensor of another shape than the teacher's is refused by name, before the load."""
    teacher = copy.deepcopy(plain)
    teacher.config.intermediate_size = 48
    with pytest.raises(ValueError, match=r"student tensor bert.encoder.layer.0.intermediate.dense.weight \(48, 32\)"):
        build_student(teacher, StudentConfig(layers=[0, 2]))


def test_modernbert_same_student_takes_the_mapped_layers_kinds(modernbert):
    """ "distilbert" map of 6 layers: [0, 3, 5], kinds full, full, sliding (the family's per-layer field)."""
    student, record = build_student(modernbert, StudentConfig(layers="distilbert"))
    assert record["layer_map"] == [0, 3, 5]
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_modernbert_copied_map_must_start_at_layer_0_random_need_not(modernbert):
    """Block 0 of ModernBERT has no attention norm: a copied map must start at teacher layer 0; a random student
    copies nothing, so the same map is fine."""
    with pytest.raises(ConfigError, match=r"student\.layers: \[1, 3, 5\] starts at teacher layer 1"):
        build_student(modernbert, StudentConfig(layers=[1, 3, 5]))
    student, record = build_student(modernbert, StudentConfig(layers=[1, 3, 5], init="random"))
    assert record["layer_map"] == [1, 3, 5] and record["init"] == "random" and record["copied"] == {}
    assert student.config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------------ init="random"
def test_random_same_student_sizes_kernel_notes_and_init_range(odd):
    """hidden 12 is not a multiple of the teacher's head size 8: the teacher's 4 heads are kept (head size 3);
    intermediate 64 * 12 / 32 = 24; the eager kernel; weights drawn with the teacher's initializer_range 0.05."""
    student, record = build_student(odd, StudentConfig(layers="every_other", init="random", hidden_size=12))
    c = student.config
    assert type(student).__name__ == "BertForMaskedLM" and c._attn_implementation == "eager"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 12, 4, 24)
    assert record["notes"] == ["random init: 2 layers, hidden 12, 4 heads, intermediate 24"]
    assert record["copied"] == {} and record["initialized"] == sorted(student.state_dict())
    assert record["architecture"] == "same" and record["init"] == "random"
    w = student.state_dict()["bert.encoder.layer.0.intermediate.dense.weight"]  # 24 x 12 = 288 draws of N(0, 0.05)
    assert 0.04 < float(w.std()) < 0.06


def test_random_same_student_keeps_sdpa_and_the_pooler_or_its_absence(plain, pooled, bare):
    student, _ = build_student(plain, StudentConfig(init="random", hidden_size=16))
    assert student.config._attn_implementation == "sdpa"
    with_pooler, _ = build_student(pooled, StudentConfig(init="random", hidden_size=16))
    without, _ = build_student(bare, StudentConfig(init="random", hidden_size=16))
    assert with_pooler.state_dict()["pooler.dense.weight"].shape == (16, 16)
    assert without.pooler is None


@pytest.mark.parametrize(("embedding", "expected"), [(32, 16), (16, 16)])
def test_random_electra_student_embedding_size(embedding, expected):
    """An embedding as wide as the teacher's hidden follows the student's hidden (16); a narrower one (the
    generator's 16) is kept."""
    from transformers import ElectraForMaskedLM

    teacher = electra(ElectraForMaskedLM, embedding)
    student, _ = build_student(teacher, StudentConfig(init="random", hidden_size=16 if embedding == 32 else 24))
    assert student.config.embedding_size == expected
    assert student.state_dict()["electra.embeddings.word_embeddings.weight"].shape == (VOCAB, expected)


def test_random_student_of_a_distilbert_teacher():
    """DistilBERT's own names (dim, hidden_dim) through its family adapter."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    student, record = build_student(seeded(DistilBertForMaskedLM, cfg), StudentConfig(init="random", hidden_size=16))
    c = student.config
    assert (c.n_layers, c.dim, c.n_heads, c.hidden_dim) == (2, 16, 2, 32)
    assert record["notes"] == ["random init: 2 layers, hidden 16, 2 heads, intermediate 32"]


def test_random_distilbert_student_takes_the_teacher_config(odd):
    cfg = StudentConfig(layers="every_other", init="random", architecture="distilbert", hidden_size=16)
    student, record = build_student(odd, cfg)
    c = student.config
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert (c.vocab_size, c.max_position_embeddings) == (VOCAB, 64)
    assert (c.n_layers, c.n_heads, c.dim, c.hidden_dim) == (2, 2, 16, 32)
    assert (c.dropout, c.attention_dropout, c.activation, c.initializer_range) == (0.2, 0.3, "relu", 0.05)
    assert (c.pad_token_id, c._attn_implementation) == (3, "eager")
    assert record["notes"] == ["random init: 2 layers, hidden 16, 2 heads, intermediate 32"]
    w = student.state_dict()[
        "distilbert.embeddings.word_embeddings.weight"
    ]  # 99 x 16 draws of N(0, 0.05), the pad row zero
    assert 0.04 < float(w.std()) < 0.06 and not w[3].any()


def test_random_distilbert_student_of_a_teacher_without_head_has_none(bare):
    cfg = StudentConfig(init="random", architecture="distilbert", hidden_size=16)
    student, record = build_student(bare, cfg)
    assert type(student).__name__ == "DistilBertModel" and record["student_class"] == "DistilBertModel"
    assert student.config._attn_implementation == "sdpa"
