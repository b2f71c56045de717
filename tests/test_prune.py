"""Width pruning (student.init="prune", pretrain/prune.py) on tiny real models: exactness, slicing, importance,
export, determinism, the projection's initialisation, bad input, and a short training run end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from pretrain.prune import calibration_batches, compute_importance, resolve_targets, roles_of, top_k
from pretrain.schema import ConfigError, from_dict
from pretrain.student import StudentConfig, build_student, find_layer_list
from tests import tiny
from tests.helpers import assert_close_recorded


def batches(tokenizer, n: int = 12, length: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of real text (the tiny corpus), with some padding."""
    lines = tiny.corpus(1)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(lines), generator=g)[:n].tolist()
    enc = tokenizer(
        [lines[i] for i in pick], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    return [
        {"input_ids": ids[: n // 2], "attention_mask": mask[: n // 2]},
        {"input_ids": ids[n // 2 :], "attention_mask": mask[n // 2 :]},
    ]


def cfg(**kw) -> StudentConfig:
    return from_dict(StudentConfig, {"init": "prune", **kw}, "student")


def outputs(model, cal):
    model.eval()
    with torch.no_grad():
        b = cal[0]
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    return out


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pruning_to_the_teachers_sizes_reproduces_the_teacher(family, bert_tok, roberta_tok):
    tok = bert_tok if family == "bert" else roberta_tok
    teacher = (tiny.bert_model if family == "bert" else tiny.roberta_model)(tok, layers=3)
    cal = batches(tok)
    student, record = build_student(teacher, cfg(layers=[0, 1, 2]), cal)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert t_state.keys() == s_state.keys()
    for k in t_state:
        assert torch.equal(t_state[k].float(), s_state[k]), k
    a, b = outputs(teacher, cal), outputs(student, cal)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=False))
    p = record["prune"]
    assert p["hidden_channels"] == list(range(32)) and p["heads"] == [[0, 1, 2, 3]] * 3
    json.dumps(record)  # the record goes to the run log as JSON


def test_pruned_tensors_are_the_kept_slices_of_the_teacher(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=4, hidden=32, heads=4)
    student, record = build_student(
        teacher, cfg(layers="every_other", hidden_size=16, intermediate_size=48), batches(bert_tok)
    )
    sc = student.config
    assert (sc.hidden_size, sc.num_attention_heads, sc.intermediate_size, sc.num_hidden_layers) == (16, 2, 48, 2)
    p = record["prune"]
    ch = torch.tensor(p["hidden_channels"])
    assert p["hidden_channels"] == sorted(p["hidden_channels"]) and len(ch) == 16
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"][:, ch])
    assert torch.equal(s["bert.embeddings.LayerNorm.weight"], t["bert.embeddings.LayerNorm.weight"][ch])
    for i, tl in enumerate(record["layer_map"]):
        heads, neurons = p["heads"][i], torch.tensor(p["neurons"][i])
        assert heads == sorted(heads) and len(heads) == 2 and len(neurons) == 48
        att = torch.tensor([h * 8 + j for h in heads for j in range(8)])
        pre_s, pre_t = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{tl}."
        for qkv in ("query", "key", "value"):
            w = t[pre_t + f"attention.self.{qkv}.weight"]
            assert torch.equal(s[pre_s + f"attention.self.{qkv}.weight"], w[att][:, ch])
            assert torch.equal(s[pre_s + f"attention.self.{qkv}.bias"], t[pre_t + f"attention.self.{qkv}.bias"][att])
        assert torch.equal(
            s[pre_s + "attention.output.dense.weight"], t[pre_t + "attention.output.dense.weight"][ch][:, att]
        )
        assert torch.equal(
            s[pre_s + "intermediate.dense.weight"], t[pre_t + "intermediate.dense.weight"][neurons][:, ch]
        )
        assert torch.equal(s[pre_s + "output.dense.weight"], t[pre_t + "output.dense.weight"][ch][:, neurons])
        assert torch.equal(s[pre_s + "output.LayerNorm.bias"], t[pre_t + "output.LayerNorm.bias"][ch])
    assert torch.equal(
        s["cls.predictions.transform.dense.weight"], t["cls.predictions.transform.dense.weight"][ch][:, ch]
    )
    assert torch.equal(s["cls.predictions.bias"], t["cls.predictions.bias"])
    # the decoder stays tied to the word embeddings
    mlm: Any = student  # the BertForMaskedLM's submodules by attribute
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    assert record["copied"]["bert.encoder.layer.1.intermediate.dense.weight"].startswith(
        "bert.encoder.layer.2.intermediate.dense.weight[neurons, channels]"
    )


def test_importance_ranks_a_silenced_head_neuron_and_channel_last(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=2, hidden=32, heads=4)
    layers: Any = find_layer_list(teacher)[1]
    with torch.no_grad():
        att = slice(2 * 8, 3 * 8)  # head 2 of layer 1: zero values -> zero output
        layers[1].attention.self.value.weight[att] = 0
        layers[1].attention.self.value.bias[att] = 0
        for layer in layers:  # neuron 5 of both layers: gelu(0) = 0
            layer.intermediate.dense.weight[5] = 0
            layer.intermediate.dense.bias[5] = 0
        for _name, mod in teacher.named_modules():  # channel 7: zero in every LayerNorm
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight[7], mod.bias[7] = 0, 0
    cal = batches(bert_tok)
    imp = compute_importance(teacher, cal, [0, 1])
    assert int(imp.heads[1].argmin()) == 2 and float(imp.heads[1][2]) == 0.0
    assert all(int(imp.neurons[t].argmin()) == 5 and float(imp.neurons[t][5]) == 0.0 for t in (0, 1))
    assert int(imp.channels.argmin()) == 7 and float(imp.channels[7]) == 0.0
    assert imp.sequences == sum(len(b["input_ids"]) for b in cal)
    assert imp.tokens == sum(int(b["attention_mask"].sum()) for b in cal)
    # pruning away the silenced neuron leaves the outputs unchanged (up to the order of the sums)
    student, record = build_student(teacher, cfg(layers=[0, 1], intermediate_size=127), cal)
    assert all(5 not in kept for kept in record["prune"]["neurons"])
    assert_close_recorded(
        "logits after pruning a silenced neuron",
        outputs(student, cal).logits,
        outputs(teacher, cal).logits,
        rtol=1e-5,
        atol=1e-5,
    )
    # heads go with channels (a standard config has hidden = heads x head size): the silenced head is dropped first
    _, record2 = build_student(teacher, cfg(layers=[1], hidden_size=24, intermediate_size=128), cal)
    assert record2["prune"]["heads"] == [[0, 1, 3]] and 7 not in record2["prune"]["hidden_channels"]


def test_exported_pruned_student_reloads_with_from_pretrained(bert_tok, roberta_tok, tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    for family, tok, make in (("bert", bert_tok, tiny.bert_model), ("roberta", roberta_tok, tiny.roberta_model)):
        teacher = make(tok, layers=4)
        cal = batches(tok)
        student, _ = build_student(teacher, cfg(hidden_size=16, intermediate_size=40), cal)
        student.save_pretrained(tmp_path / family)
        config = AutoConfig.from_pretrained(tmp_path / family)
        assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (16, 2, 40)
        assert not getattr(config, "pruned_heads", None)
        loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / family)
        a, b = outputs(student, cal), outputs(loaded, cal)
        assert torch.equal(a.logits, b.logits), family
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_bare_encoder_with_pooler(bert_tok):
    from transformers import BertConfig, BertModel

    conf = BertConfig(
        vocab_size=len(bert_tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    teacher = BertModel(conf).eval()
    student, record = build_student(teacher, cfg(layers=[0, 1], hidden_size=16), batches(bert_tok))
    ch = torch.tensor(record["prune"]["hidden_channels"])
    pooler = dict(student.named_parameters())["pooler.dense.weight"]
    assert torch.equal(pooler, teacher.pooler.dense.weight[ch][:, ch].float())
    assert student.config.intermediate_size == 32  # null: the teacher's ratio


def test_selection_is_deterministic_from_the_seed_and_the_sample(bert_tok, tmp_path):
    from tests.helpers import assets

    shards = assets()["shards-bert"]
    a = calibration_batches(shards, n=10, seed=3, pad_id=0)
    b = calibration_batches(shards, n=10, seed=3)  # pad id from the manifest
    c = calibration_batches(shards, n=10, seed=4, pad_id=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=False))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=False))
    assert sum(len(x["input_ids"]) for x in a) == 10
    teacher = tiny.bert_model(bert_tok, layers=4)
    r1 = build_student(teacher, cfg(hidden_size=16), a)[1]["prune"]
    r2 = build_student(teacher, cfg(hidden_size=16), b)[1]["prune"]
    assert r1 == r2
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2) == [1, 2]  # ties: lower index; kept in original order
    assert top_k(torch.tensor([2.0, 1.0, 2.0, 2.0]), 2) == [0, 2]


def test_projection_starts_from_the_channel_selection(bert_tok):
    from pretrain.distill import DistillationModel
    from pretrain.losses import LossConfig

    teacher = tiny.bert_model(bert_tok, layers=4)
    cal = batches(bert_tok)
    student, record = build_student(teacher, cfg(hidden_size=16), cal)
    loss = from_dict(
        LossConfig, {"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_mse": 1.0, "alpha_att": 1.0}, "loss"
    )
    model = DistillationModel(student, teacher, loss, record["layer_map"])
    ch = record["prune"]["hidden_channels"]
    assert model.projections is not None
    for proj in model.projections.values():
        x = torch.randn(3, 16)
        y = proj(x)
        assert torch.equal(y[:, ch], x)
        others = [c for c in range(32) if c not in ch]
        assert torch.equal(y[:, others], torch.zeros(3, 16))
    # the explicit argument wins; a random student keeps nn.Linear's initialisation
    rnd, rec = build_student(teacher, from_dict(StudentConfig, {"init": "random", "hidden_size": 16}, "student"))
    m2 = DistillationModel(rnd, teacher, loss, rec["layer_map"])
    first: Any = next(iter(m2.projections.values())) if m2.projections is not None else None
    assert not torch.equal(first.bias, torch.zeros(32))
    m3 = DistillationModel(rnd, teacher, loss, rec["layer_map"], hidden_channels=list(range(0, 32, 2)))
    first = next(iter(m3.projections.values())) if m3.projections is not None else None
    assert torch.equal(first.weight[::2], torch.eye(16))
    ids, am = cal[0]["input_ids"], cal[0]["attention_mask"]
    loss_value, logs = model.eval()(ids, am, torch.full_like(ids, -100))  # eval: no dropout
    # the hidden MSE recomputed from the raw hidden states and the selection alone: at initialisation a projection
    # puts student channel j on teacher channel ch[j] and 0 on the pruned channels, so per pair (student state i,
    # teacher state layer_map[i], the last with the last) the error is sum over kept channels of (h_s[j] -
    # h_t[ch[j]])^2 plus sum over pruned channels of h_t^2, over 32 units, mean over real tokens, then over pairs
    with torch.no_grad():
        hs = student(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
        ht = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    lm = record["layer_map"]
    pairs = [(i, lm[i]) for i in range(1, len(lm))] + [(len(lm), len(ht) - 1)]
    real, pruned = am.bool(), [c for c in range(32) if c not in ch]
    per_pair = [
        ((hs[i].double() - ht[t][..., ch].double()).pow(2).sum(-1) + ht[t][..., pruned].double().pow(2).sum(-1))[
            real
        ].mean()
        / 32
        for i, t in pairs
    ]
    want = float(sum(per_pair)) / len(per_pair)
    assert want > 1e-3 and float(logs["loss_mse"]) == pytest.approx(want, rel=1e-5)  # fp32 sums vs float64
    assert float(loss_value.detach()) == pytest.approx(float(logs["loss_mse"]) + float(logs["loss_att"]), rel=1e-6)


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"hidden_size": 64}, "student.hidden_size"),
        ({"num_attention_heads": 8, "hidden_size": 32}, "student.num_attention_heads"),
        ({"intermediate_size": 256}, "student.intermediate_size"),
        ({"hidden_size": 20}, "student.hidden_size"),  # not a multiple of the head size 8
        ({"hidden_size": 24, "num_attention_heads": 2}, "student.num_attention_heads"),  # head size 12 != 8
    ],
)
def test_bad_targets_are_config_errors_before_any_work(spec, key, bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=2)
    with pytest.raises(ConfigError, match=key):
        build_student(teacher, cfg(**spec), calibration=[])  # refused before the (empty) calibration is read


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "student.num_attention_heads"),
        ({"num_hidden_layers": 2}, "student.num_hidden_layers"),
        ({"architecture": "distilbert"}, "student.architecture"),
        ({"calibration_sequences": 0}, "student.calibration_sequences"),
    ],
)
def test_bad_config_is_refused_at_load(spec, key):
    with pytest.raises(ConfigError, match=key):
        cfg(**spec)


def test_empty_calibration_is_a_config_error(bert_tok, tmp_path):
    teacher = tiny.bert_model(bert_tok, layers=2)
    with pytest.raises(ConfigError, match=r"student\.calibration_sequences"):
        build_student(teacher, cfg(hidden_size=16), calibration=[])
    empty = [{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.zeros(2, 8, dtype=torch.long)}]
    with pytest.raises(ConfigError, match=r"student\.calibration_sequences"):
        build_student(teacher, cfg(hidden_size=16), calibration=empty)
    with pytest.raises(ConfigError, match=r"data\.dir.*calibration"):
        calibration_batches(tmp_path / "none", n=4, seed=0)
    with pytest.raises(ConfigError, match=r"student\.calibration_sequences"):
        calibration_batches(tmp_path, n=0, seed=0)


def test_pruning_without_a_calibration_sample_says_what_to_pass(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=2)
    with pytest.raises(ConfigError, match=r"student\.init: 'prune' needs a calibration sample.*calibration_batches"):
        build_student(teacher, cfg(hidden_size=16))


def test_the_recipe_passes_its_calibration_sample_explicitly(tmp_path):
    """PretrainRecipe draws the sample from data.dir (student.calibration_sequences, train.seed) and hands it to
    build_student as an argument; nothing reaches build_student any other way (no context variable)."""
    from transformers import AutoModelForMaskedLM

    from pretrain.config import load
    from pretrain.recipes import PretrainRecipe
    from tests.helpers import REPO, assets, tiny_overrides

    prune = {"student.init": "prune", "student.hidden_size": 16, "student.calibration_sequences": 12}
    run = load(
        REPO / "configs" / "tiny-cpu.json", tiny_overrides("bert", tmp_path, steps=3, **prune, **{"train.seed": 5})
    )
    recipe = PretrainRecipe(run)
    expected = calibration_batches(run.data.dir, n=12, seed=5)
    sample = recipe.calibration("cpu")
    assert sample is not None and len(sample) == len(expected)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(sample, expected, strict=True))
    teacher = AutoModelForMaskedLM.from_pretrained(assets()["bert"])
    student, record = recipe.build_student(teacher)
    direct, direct_record = build_student(teacher, run.student, expected)
    assert record["prune"] == direct_record["prune"] and record["prune"]["calibration"]["sequences"] == 12
    assert all(
        torch.equal(a, b) for a, b in zip(student.state_dict().values(), direct.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match=r"student\.init: 'prune' needs"):
        build_student(teacher, run.student)
    other = load(REPO / "configs" / "tiny-cpu.json", tiny_overrides("bert", tmp_path, steps=3))
    assert PretrainRecipe(other).calibration() is None  # only pruning draws a sample


def test_other_layouts_are_refused(bert_tok):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    conf = DistilBertConfig(vocab_size=len(bert_tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    teacher = DistilBertForMaskedLM(conf).eval()
    with pytest.raises(ConfigError, match=r"student\.init"):
        build_student(teacher, cfg(hidden_size=16), batches(bert_tok))
    with pytest.raises(ConfigError, match=r"student\.init"):
        resolve_targets(
            type(
                "C", (), {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "embedding_size": 16}
            )(),
            16,
            None,
            None,
        )
    assert roles_of("bert.encoder.layer.0.attention.output.dense.weight") == ("H", "A")
    assert roles_of("bert.encoder.layer.0.output.dense.weight") == ("H", "F")


def test_training_run_with_a_pruned_student(tmp_path):
    """tiny-cpu.json with student.init=prune: calibration from the run's shards, the record in student_init's
    distill_export.json, a few real steps, an export that loads with from_pretrained."""
    from transformers import AutoModelForMaskedLM

    from pretrain.config import load
    from tests.helpers import REPO, read_metrics, tiny_overrides, train_in_process

    out = tmp_path / "run"
    over = tiny_overrides(
        "bert",
        out,
        steps=3,
        **{
            "student.init": "prune",
            "student.hidden_size": 16,
            "student.intermediate_size": 48,
            "student.calibration_sequences": 16,
            "train.eval_interval": 0,
            "train.save_interval": 0,
            "train.tensorboard": False,
            "deepspeed.zero_optimization.stage": 0,
        },
    )
    trainer = train_in_process(load(REPO / "configs" / "tiny-cpu.json", over))
    rec = trainer.student_record["prune"]
    assert rec["calibration"]["sequences"] == 16 and len(rec["hidden_channels"]) == 16
    info = json.loads((out / "student_init" / "distill_export.json").read_text())
    assert info["student"]["prune"]["hidden_channels"] == rec["hidden_channels"]
    assert info["student"]["init"] == "prune"
    steps = read_metrics(out)
    assert [r["step"] for r in steps][-1] == 3 and all(r["loss"] == r["loss"] for r in steps)
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    assert student.config.hidden_size == 16 and student.config.intermediate_size == 48
    init = AutoModelForMaskedLM.from_pretrained(out / "student_init")
    assert not torch.equal(init.bert.embeddings.LayerNorm.weight, student.bert.embeddings.LayerNorm.weight)
