"""Student construction: layer maps, exact copies, all-layer identity, DistilBERT conversion, save / Auto load."""

from __future__ import annotations

import itertools

import pytest
import torch

from pretrain.schema import ConfigError, from_dict
from pretrain.student import StudentConfig, build_student, find_layer_list, resolve_layer_map
from tests import tiny
from tests.helpers import assert_close_recorded

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "to be, or not to be",
    "knowledge distillation trains a small student to match a large teacher network.",
]


def batch(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def teacher_for(family, tok, mlm=True):
    make = tiny.bert_model if family == "bert" else tiny.roberta_model
    return make(tok, layers=4, mlm=mlm)


def assert_copied(student, teacher, record):
    """Every student tensor is in the record and equals its teacher tensor; layer i really comes from map[i]."""
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert set(record["copied"]) == set(s_sd)
    for key, src in record["copied"].items():
        assert torch.equal(s_sd[key], t_sd[src]), key
    _, s_layers = find_layer_list(student)
    _, t_layers = find_layer_list(teacher)
    for i, t_i in enumerate(record["layer_map"]):
        s_w = next(s_layers[i].parameters())
        assert torch.equal(s_w, next(t_layers[t_i].parameters()))
        others = [j for j in range(len(t_layers)) if j != t_i]
        assert not any(torch.equal(s_w, next(t_layers[j].parameters())) for j in others)


def test_layer_maps():
    assert resolve_layer_map("every_other", 12) == [0, 2, 4, 6, 8, 10]
    assert resolve_layer_map("every_other", 6) == [0, 2, 4]
    assert resolve_layer_map("distilbert", 12) == [0, 2, 4, 7, 9, 11]
    for n in range(2, 25):
        m = resolve_layer_map("distilbert", n)
        assert len(m) == n // 2 and m[-1] == n - 1 and all(a < b for a, b in itertools.pairwise(m))
        assert m[0] == 0 or n < 4
    assert resolve_layer_map([1, 3], 4) == [1, 3]
    for bad in ([4], [2, 1], [], "every_third"):
        with pytest.raises(ConfigError, match=r"student\.layers"):
            resolve_layer_map(bad, 4)


def test_config_validation():
    assert from_dict(StudentConfig, {"layers": [0, 5]}, "student").layers == [0, 5]
    bad = [
        ({"layers": "alternate"}, "student.layers"),
        ({"layers": [0, 0]}, "student.layers"),
        ({"architecture": "tiny"}, "student.architecture"),
        ({"init": "zeros"}, "student.init"),
        ({"hidden_size": 128}, "student.hidden_size.*init='random'"),
        ({"init": "random", "hidden_size": 30, "num_attention_heads": 4}, "student.num_attention_heads"),
    ]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict(StudentConfig, raw, "student")


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("mlm", [True, False])
def test_same_architecture(family, mlm, bert_tok, roberta_tok):
    tok = bert_tok if family == "bert" else roberta_tok
    teacher = teacher_for(family, tok, mlm)
    student, record = build_student(teacher, StudentConfig(layers="every_other"))
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert record["layer_map"] == [0, 2] and record["teacher_layers"] == 4
    assert student.config._attn_implementation == "sdpa" and student.training
    assert_copied(student, teacher, record)
    # all layers: exactly the teacher's function
    full, _ = build_student(teacher, StudentConfig(layers=[0, 1, 2, 3]))
    full.eval()
    with torch.no_grad():
        a, b = teacher(**batch(tok)), full(**batch(tok))
    out = "logits" if mlm else "last_hidden_state"
    assert torch.equal(getattr(a, out), getattr(b, out))


def test_other_encoders_found_by_structure():
    """ELECTRA generator and XLM-R students by the same structural rule."""
    from transformers import ElectraConfig, ElectraForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    torch.manual_seed(0)
    models = [
        ElectraForMaskedLM(
            ElectraConfig(
                vocab_size=99,
                embedding_size=16,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ),
        XLMRobertaForMaskedLM(
            XLMRobertaConfig(
                vocab_size=99,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=64,
                pad_token_id=1,
                max_position_embeddings=40,
            )
        ),
    ]
    ids = torch.randint(5, 99, (2, 9))
    for teacher in models:
        teacher.eval()
        student, record = build_student(teacher, StudentConfig(layers="distilbert"))
        assert record["layer_map"] == [0, 3]
        assert_copied(student, teacher, record)
        full, _ = build_student(teacher, StudentConfig(layers=[0, 1, 2, 3]))
        with torch.no_grad():
            assert torch.equal(teacher(ids).logits, full.eval()(ids).logits)


@pytest.mark.parametrize("mlm", [True, False])
def test_distilbert_conversion(mlm, bert_tok):
    """A real DistilBERT whose hidden states (and logits) equal the truncated BERT's with token_type_ids = 0."""
    from transformers import DistilBertForMaskedLM, DistilBertModel

    teacher = teacher_for("bert", bert_tok, mlm)
    with torch.no_grad():  # make the type-0 embedding matter, so that folding is tested
        teacher.base_model.embeddings.token_type_embeddings.weight[0].normal_(
            0, 1.0, generator=torch.Generator().manual_seed(0)
        )
    cfg = StudentConfig(layers=[0, 2, 3], architecture="distilbert")
    student, record = build_student(teacher, cfg)
    assert type(student) is (DistilBertForMaskedLM if mlm else DistilBertModel)
    assert (
        "token_type_embeddings"
        in record["copied"][("distilbert." if mlm else "") + "embeddings.position_embeddings.weight"]
    )
    truncated, _ = build_student(teacher, StudentConfig(layers=[0, 2, 3]))
    inputs = batch(bert_tok)
    with torch.no_grad():
        d = student.eval()(**inputs, output_hidden_states=True)
        b = truncated.eval()(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]), output_hidden_states=True)
    assert len(d.hidden_states) == len(b.hidden_states) == 4
    real = inputs["attention_mask"].bool()
    for hd, hb in zip(d.hidden_states, b.hidden_states, strict=False):
        assert_close_recorded("hidden states, DistilBERT vs truncated BERT", hd[real], hb[real], atol=1e-5, rtol=0)
    if mlm:
        assert_close_recorded("logits, DistilBERT vs truncated BERT", d.logits[real], b.logits[real], atol=1e-5, rtol=0)


def test_distilbert_needs_bert(roberta_tok):
    with pytest.raises(ConfigError, match=r"student\.architecture.*'same'"):
        build_student(teacher_for("roberta", roberta_tok), StudentConfig(architecture="distilbert"))


@pytest.mark.parametrize("architecture", ["same", "distilbert"])
def test_save_and_auto_load(architecture, bert_tok, tmp_path):
    from transformers import AutoModelForMaskedLM

    student, _ = build_student(teacher_for("bert", bert_tok), StudentConfig(architecture=architecture))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is type(student)
    inputs = batch(bert_tok)
    with torch.no_grad():
        assert torch.equal(student.eval()(**inputs).logits, loaded.eval()(**inputs).logits)


def test_random_init(bert_tok):
    teacher = teacher_for("bert", bert_tok)
    cfg = from_dict(StudentConfig, {"init": "random", "hidden_size": 16, "num_hidden_layers": 3}, "student")
    student, record = build_student(teacher, cfg)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers) == (16, 2, 64, 3)
    assert record["copied"] == {} and record["initialized"]
    assert record["layer_map"] == [0, 2, 3]  # TinyBERT's uniform map for 4 -> 3 layers
    with torch.no_grad():
        assert student(**batch(bert_tok)).logits.shape[-1] == teacher.config.vocab_size
    with pytest.raises(ConfigError, match=r"student\.layers"):
        build_student(teacher, StudentConfig(init="random", layers=[0, 1], num_hidden_layers=3))
    d, _ = build_student(teacher, StudentConfig(init="random", architecture="distilbert", hidden_size=16))
    assert type(d).__name__ == "DistilBertForMaskedLM" and d.config.n_layers == 2 and d.config.dim == 16


def pretrain_imports() -> dict[str, set[str]]:
    """pretrain module -> the pretrain modules its file imports, at module level or inside functions (parsed)."""
    import ast
    from pathlib import Path

    graph = {}
    for path in (Path(__file__).resolve().parents[1] / "pretrain").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pretrain":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pretrain."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pretrain.")}
        graph[path.stem] = deps
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_student_prune_and_structure_import_one_way():
    """student -> prune -> structure, never back (no cycle, even through imports inside functions)."""
    graph = pretrain_imports()
    assert "student" not in reachable(graph, "prune")
    assert "prune" in graph["student"] and "structure" in graph["prune"]
    assert graph["structure"] == set()  # the structure helpers import no pretrain module


def test_build_student_refuses_a_module_that_is_not_a_hugging_face_model():
    with pytest.raises(TypeError, match=r"Linear is not a Hugging Face PreTrainedModel"):
        build_student(torch.nn.Linear(2, 2), StudentConfig())
