"""The family adapters (pretrain.families) and what asks them: surgery, Q/K/V, relation losses, kernels, the head.

Tiny random configs built from the transformers config classes (no download) for every family: BERT, RoBERTa, XLM-R,
ELECTRA, DistilBERT, DeBERTa-v2/v3, MPNet, ModernBERT.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import transformers as T

from pretrain import families
from pretrain.distill import DistillationModel, find_qkv
from pretrain.families import family_of, tap_qkv
from pretrain.losses import LossConfig, attention_kl
from pretrain.schema import ConfigError
from pretrain.student import StudentConfig, build_student, cadence_layer_map, resolve_layer_map, teacher_layer_map
from tests import tiny

V, H, HEADS = 100, 32, 4
COMMON = {"vocab_size": V, "hidden_size": H, "num_attention_heads": HEADS, "intermediate_size": 48}


def modernbert_config(layers: int = 12, **kw) -> T.ModernBertConfig:
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}
    return T.ModernBertConfig(
        **COMMON, num_hidden_layers=layers, local_attention=8, max_position_embeddings=64, **ids, **kw
    )


def config_of(family: str, layers: int = 4):
    """A tiny random config of ``family`` with ``layers`` layers."""
    if family == "modernbert":
        return modernbert_config(layers)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=V, dim=H, n_heads=HEADS, hidden_dim=48, n_layers=layers)
    if family == "deberta-v2":  # the DeBERTa-v3 layout: relative attention, shared keys, no absolute positions
        return T.DebertaV2Config(
            **COMMON,
            num_hidden_layers=layers,
            relative_attention=True,
            position_buckets=16,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            max_position_embeddings=64,
        )
    cls = {
        "bert": T.BertConfig,
        "roberta": T.RobertaConfig,
        "xlm-roberta": T.XLMRobertaConfig,
        "electra": T.ElectraConfig,
        "mpnet": T.MPNetConfig,
    }[family]
    return cls(**COMMON, num_hidden_layers=layers, max_position_embeddings=72)


ALL = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "mpnet", "modernbert")


def mlm_model(family: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return T.AutoModelForMaskedLM.from_config(config_of(family, layers)).eval()


def batch(seed: int = 0, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (2, length), generator=g)
    am = torch.ones_like(ids)
    am[1, length - 7 :] = 0
    return ids, am, torch.full_like(ids, -100)


# ----------------------------------------------------------------------------------------------------------------
# ModernBERT surgery


def test_modernbert_distilbert_map_saves_reloads_and_keeps_layer_kinds(tmp_path):
    """Issue 21: the student's layer_types follow the copied layers; the export reloads to the same outputs."""
    teacher = mlm_model("modernbert", layers=12)
    student, record = build_student(teacher, StudentConfig(layers="distilbert"))
    assert record["layer_map"] == [0, 2, 4, 7, 9, 11]
    kinds = [teacher.config.layer_types[i] for i in record["layer_map"]]
    assert kinds == ["full_attention", *["sliding_attention"] * 3, "full_attention", "sliding_attention"]
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():  # every tensor equals its recorded source
        assert torch.equal(value, t_state[record["copied"][key]]), key
    student.eval().save_pretrained(tmp_path)  # raised StrictDataclassClassValidationError before
    reloaded = T.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == kinds
    assert [b.attn.sliding_window for b in reloaded.model.layers] == [None, 5, 5, 5, None, 5]
    assert reloaded.config.local_attention == teacher.config.local_attention
    assert reloaded.config.rope_parameters == teacher.config.rope_parameters
    ids, am, _ = batch(length=24)  # longer than the sliding window (4 each side): the kinds matter
    with torch.no_grad():
        a, b = student(input_ids=ids, attention_mask=am).logits, reloaded(input_ids=ids, attention_mask=am).logits
    assert float((a - b).abs().max()) <= 1e-5


def test_modernbert_cadence_preset_and_slot_zero():
    kinds = modernbert_config(12).layer_types
    assert cadence_layer_map(kinds) == [0, 2, 4, 6, 8, 11]
    assert [kinds[i] for i in cadence_layer_map(kinds)] == kinds[:6]
    kinds22 = modernbert_config(22).layer_types  # ModernBERT-base's depth
    m22 = resolve_layer_map("cadence", 22, kinds22)
    assert [kinds22[i] for i in m22] == kinds22[:11] and m22[0] == 0 and m22 == sorted(set(m22))
    assert resolve_layer_map("cadence", 12, None) == resolve_layer_map("distilbert", 12)
    teacher = mlm_model("modernbert", layers=6)
    with pytest.raises(ConfigError, match=r"student.layers: \[1, 3\] starts at teacher layer 1.*attn_norm"):
        build_student(teacher, StudentConfig(layers=[1, 3]))
    random_student, _ = build_student(teacher, StudentConfig(layers=[1, 3], init="random"))
    assert random_student.config.layer_types == ["sliding_attention", "full_attention"]


# ----------------------------------------------------------------------------------------------------------------
# Q / K / V and the relation losses


@pytest.mark.parametrize("family", ALL)
def test_qkv_found_and_taken_on_every_family(family):
    model = mlm_model(family, layers=2)
    src = find_qkv(model, 1)
    assert (src.fused is not None) == (family == "modernbert")
    got: dict[int, torch.Tensor] = {}
    handles = tap_qkv(src, lambda j, t: got.__setitem__(j, t))
    ids, am, _ = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    for h in handles:
        h.remove()
    assert sorted(got) == [0, 1, 2] and all(t.shape == (2, 24, H) for t in got.values())


def _kl_reference(log_t: torch.Tensor, log_s: torch.Tensor, am: torch.Tensor) -> float:
    """KL(teacher || student) over keys, mean over heads and real queries, computed here in float64."""
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, R, L]
    queries = am.bool()[:, None, :].expand_as(kl)
    return float(kl[queries].mean())


def _eager_log_attention(model, layer: int, ids, am) -> torch.Tensor:
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(input_ids=ids, attention_mask=am, output_attentions=True).attentions[layer].double()
    return att.clamp_min(1e-300).log().masked_fill(~am.bool()[:, None, None, :], 0.0)


def _perturbed(student: torch.nn.Module, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return student.eval()


@pytest.mark.parametrize("family", ["electra", "modernbert"])
def test_attention_term_equals_the_models_own_attention(family):
    """Separate (ELECTRA) and fused + RoPE (ModernBERT): loss_att under SDPA == the KL between the eager models' own
    attention probabilities; for ModernBERT on full-attention layers 0 and 3, with sequences longer than the window."""
    teacher = mlm_model(family, layers=4)  # relation_layers "last": student layer 1 <-> teacher layer 3
    student, record = build_student(teacher, StudentConfig(layers=[0, 3]))
    student = _perturbed(student)
    cfg = LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=0, alpha_att=1.0)
    ids, am, labels = batch(length=32)
    _, logs = DistillationModel(student, teacher, cfg, record["layer_map"])(ids, am, labels)
    ref = _kl_reference(_eager_log_attention(teacher, 3, ids, am), _eager_log_attention(student, 1, ids, am), am)
    assert ref > 1e-4
    assert math.isclose(float(logs["loss_att"]), ref, rel_tol=1e-4)


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet"])
def test_relation_terms_equal_a_reference_from_the_projections(family):
    """DeBERTa-like (disentangled / relative bias): the terms are the content relations of the projections, here
    recomputed from the layer's input hidden state and the projection weights."""
    teacher = mlm_model(family, layers=2)
    student, record = build_student(teacher, StudentConfig(layers=[1], init="random"))
    student.eval()  # dropout off: the reference recomputes the projections
    cfg = LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=0, alpha_att=1.0, alpha_val=1.0)
    ids, am, labels = batch()
    _, logs = DistillationModel(student, teacher, cfg, record["layer_map"])(ids, am, labels)

    def relations(model, layer: int):
        with torch.no_grad():
            x = model.base_model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[layer]
        src = find_qkv(model, layer)
        q, k, v = (torch.nn.functional.linear(x.double(), m.weight.double(), m.bias.double()) for m in src.linears())

        def rel(a, b):
            a4, b4 = (t.view(2, -1, HEADS, H // HEADS).transpose(1, 2) for t in (a, b))
            s = a4 @ b4.transpose(-1, -2) / math.sqrt(H // HEADS)
            return s.masked_fill(~am.bool()[:, None, None, :], -1e9).log_softmax(-1)

        return rel(q, k), rel(v, v)

    (att_t, val_t), (att_s, val_s) = relations(teacher, 1), relations(student, 0)
    assert math.isclose(float(logs["loss_att"]), _kl_reference(att_t, att_s, am), rel_tol=1e-4)
    assert math.isclose(float(logs["loss_val"]), _kl_reference(val_t, val_s, am), rel_tol=1e-4)
    assert float(logs["loss_att"]) > 1e-5


def test_attention_loss_without_attentions_raises():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"received no attention inputs.*empty tuple"):
        attention_kl((), x, x, x, torch.ones(2, 5), 2)  # type: ignore[arg-type]  # what SDPA's attentions give
    with pytest.raises(ValueError, match="received no attention inputs"):
        attention_kl(torch.empty(0), x, x, x, torch.ones(2, 5), 2)
    teacher = mlm_model("modernbert", layers=2)
    student, record = build_student(teacher, StudentConfig(layers=[0, 1]))
    model = DistillationModel(student, teacher, LossConfig(alpha_att=1.0), record["layer_map"])
    model._qkv_t = [families.QKVSource(fused=torch.nn.Linear(H, 3 * H))]  # a projection that never runs
    with pytest.raises(RuntimeError, match="received no Q from the teacher's relation pair 0"):
        model(*batch())


# ----------------------------------------------------------------------------------------------------------------
# Kernels and the teacher's head


def _save(tmp_path, model, name: str):
    path = tmp_path / name
    model.save_pretrained(path)
    tiny.bert_tokenizer(V).save_pretrained(path)
    return path


def test_sdpa_falls_back_to_eager_once_for_deberta_and_mpnet(tmp_path, caplog):
    from pretrain.config import TeacherConfig
    from pretrain.evaluate import load_model
    from pretrain.teacher import Preflight, load_teacher

    families._SAID.clear()
    for family in ("deberta-v2", "mpnet", "modernbert"):
        path = _save(tmp_path, mlm_model(family, layers=2), family)
        conf = T.AutoConfig.from_pretrained(path)
        pf = Preflight(str(path), conf, None, True, {})
        with caplog.at_level(logging.WARNING, logger="pretrain.families"):
            impls = [load_teacher(TeacherConfig(name_or_path=str(path)), pf).config._attn_implementation for _ in "ab"]
            evaluated = load_model("teacher", str(path), conf, torch.device("cpu"))
        want = "sdpa" if family == "modernbert" else "eager"
        assert impls == [want, want] and evaluated.model.config._attn_implementation == want
    lines = [r.getMessage() for r in caplog.records if "no SDPA attention" in r.getMessage()]
    assert len(lines) == 2, lines  # once per class, not once per load
    assert any("DebertaV2ForMaskedLM" in m for m in lines) and any("MPNetForMaskedLM" in m for m in lines)
    assert families.attn_implementation(T.BertForMaskedLM, "flash_attention_2", cuda=False) == "sdpa"


def test_teacher_with_newly_initialised_head_is_refused_for_logit_terms(tmp_path):
    """A DeBERTa-v3-like checkpoint (encoder weights only, a *ForMaskedLM config): preflight refuses alpha_ce > 0
    before loading any weights, naming the fix; the same checkpoint passes with hidden-state terms only."""
    from pretrain.config import from_dict
    from pretrain.teacher import Preflight, load_teacher, preflight, untrained_head_keys

    encoder = mlm_model("deberta-v2", layers=2).deberta
    path = _save(tmp_path, encoder, "deberta-v3-like")
    conf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**conf, "architectures": ["DebertaV2ForMaskedLM"]}))
    missing = untrained_head_keys(str(path), T.AutoConfig.from_pretrained(path))
    assert missing and all(k.startswith("cls.predictions.") for k in missing)
    raw = {"teacher": {"name_or_path": str(path)}, "data": {"dir": str(tmp_path / "no-shards")}}
    raw["train"] = {"output_dir": str(tmp_path / "run"), "max_steps": 1}
    raw["deepspeed"] = {"train_micro_batch_size_per_gpu": 2}
    with pytest.raises(ConfigError, match=r"loss.alpha_ce: .* no trained MLM head .* Set loss.alpha_ce=0"):
        preflight(from_dict(raw))
    raw["loss"] = {"alpha_ce": 0, "alpha_mlm": 0, "alpha_cos": 1.0}
    with pytest.raises(ConfigError, match=r"data\.dir"):  # got past the head check, to the (missing) shards
        preflight(from_dict(raw))
    pf = Preflight(str(path), T.AutoConfig.from_pretrained(path), None, True, {}, needs_logits=True)
    with pytest.raises(ConfigError, match="no trained MLM head"):  # the load-time guard (hub models)
        load_teacher(from_dict(raw).teacher, pf)
    trained = _save(tmp_path, mlm_model("deberta-v2", layers=2), "deberta-mlm")
    assert untrained_head_keys(str(trained), T.AutoConfig.from_pretrained(trained)) == []


def test_a_trained_head_with_legacy_tensor_names_is_not_refused(tmp_path):
    """Older checkpoints (the demo's bert-tiny-mlm) name the head's LayerNorm gamma / beta, which from_pretrained
    renames: neither the header check nor the load-time check may refuse them."""
    from safetensors.torch import load_file, save_file

    from pretrain.config import TeacherConfig
    from pretrain.teacher import Preflight, load_teacher, untrained_head_keys

    path = _save(tmp_path, mlm_model("bert", layers=2), "bert-legacy")
    state = load_file(path / "model.safetensors")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    conf = T.AutoConfig.from_pretrained(path)
    assert untrained_head_keys(str(path), conf) == []
    pf = Preflight(str(path), conf, None, True, {}, needs_logits=True)
    loaded = load_teacher(TeacherConfig(name_or_path=str(path)), pf)
    assert torch.equal(
        loaded.cls.predictions.transform.LayerNorm.weight, state["cls.predictions.transform.LayerNorm.weight"]
    )


def test_family_lookup_and_albert_refused():
    assert family_of(config_of("xlm-roberta")).name == "roberta"
    assert family_of(T.BertConfig()).name == "bert"
    with pytest.raises(ConfigError, match="ALBERT shares one layer"):
        family_of(T.AlbertConfig())


# ----------------------------------------------------------------------------------------------------------------
# Width pruning through the adapter


def _calibration():
    ids, am, _ = batch(seed=3)
    return [{"input_ids": ids, "attention_mask": am}]


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2"])
def test_width_pruning_cuts_fused_and_shared_tensors_alike(family):
    """ModernBERT's Wqkv (Q | K | V) and Wi (input | gate) are cut with the same kept heads / neurons in every part;
    DeBERTa's shared rel_embeddings lose the pruned hidden columns; at the teacher's sizes the student is the
    teacher (same logits)."""
    teacher = mlm_model(family, layers=3)
    ids, am, _ = batch()
    same, _ = build_student(teacher, StudentConfig(layers=[0, 1, 2], init="prune"), _calibration())
    with torch.no_grad():
        diff = same.eval()(input_ids=ids, attention_mask=am).logits - teacher(input_ids=ids, attention_mask=am).logits
    assert float(diff.abs().max()) <= 1e-5
    cfg = StudentConfig(layers=[0, 2], init="prune", hidden_size=16, intermediate_size=24)
    student, record = build_student(teacher, cfg, _calibration())
    ch, heads, neurons = (record["prune"][k] for k in ("hidden_channels", "heads", "neurons"))
    t, s = teacher.state_dict(), student.state_dict()
    hd = H // HEADS
    att = [h * hd + j for h in heads[1] for j in range(hd)]  # student layer 1 <- teacher layer 2
    if family == "modernbert":
        rows = [*att, *(H + a for a in att), *(2 * H + a for a in att)]
        assert torch.equal(s["model.layers.1.attn.Wqkv.weight"], t["model.layers.2.attn.Wqkv.weight"][rows][:, ch])
        gate_rows = [*neurons[1], *(48 + n for n in neurons[1])]
        assert torch.equal(s["model.layers.1.mlp.Wi.weight"], t["model.layers.2.mlp.Wi.weight"][gate_rows][:, ch])
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 2)]
    else:
        key = "deberta.encoder.rel_embeddings.weight"
        assert torch.equal(s[key], t[key][:, ch])
        k_key = "deberta.encoder.layer.{}.attention.self.key_proj.weight"
        assert torch.equal(s[k_key.format(1)], t[k_key.format(2)][att][:, ch])
    loss, _ = DistillationModel(student, teacher, LossConfig(alpha_att=1.0, alpha_val=1.0), [0, 2])(*batch())
    assert torch.isfinite(loss)


def test_pruning_refusals_name_what_the_family_lacks():
    mpnet = mlm_model("mpnet", layers=2)
    with pytest.raises(ConfigError, match=r"student.num_attention_heads: the mpnet family cannot drop heads.*"):
        build_student(mpnet, StudentConfig(layers=[0, 1], init="prune", hidden_size=16), _calibration())
    ffn_only, _ = build_student(mpnet, StudentConfig(layers=[0, 1], init="prune", intermediate_size=24), _calibration())
    assert ffn_only.config.intermediate_size == 24 and ffn_only.config.num_attention_heads == HEADS
    with pytest.raises(ConfigError, match=r"does not support the distilbert family: its blocks are not BERT's"):
        build_student(mlm_model("distilbert", layers=2), StudentConfig(layers=[0, 1], init="prune"), _calibration())


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2-new-head"])
def test_mlm_head_gives_the_models_logits(family):
    """ModernBERT's head + decoder, DeBERTa-v2's non-legacy lm_predictions head (takes the word embeddings)."""
    from pretrain.student import mlm_head

    if family == "modernbert":
        model = mlm_model("modernbert", layers=1)
    else:
        conf = config_of("deberta-v2", 1)
        conf.legacy = False
        torch.manual_seed(0)
        model = T.DebertaV2ForMaskedLM(conf).eval()
    ids, am, _ = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        last = model.base_model(input_ids=ids, attention_mask=am).last_hidden_state
        assert torch.allclose(mlm_head(model)(last), out.logits, atol=1e-6)


def test_random_init_on_a_distilbert_teacher_uses_its_size_names():
    """DistilBertConfig names its sizes dim / hidden_dim / n_layers / n_heads: the adapter maps them (fam-bugs 1)."""
    teacher = mlm_model("distilbert", layers=4)
    cfg = StudentConfig(init="random", num_hidden_layers=2, hidden_size=16)
    student, record = build_student(teacher, cfg, None)
    c = student.config
    assert (c.dim, c.n_heads, c.n_layers, c.hidden_dim) == (16, 2, 2, 24)  # heads keep head_dim 8; FFN 48 * 16 / 32
    assert type(student) is type(teacher) and record["copied"] == {}
    ids, am, _ = batch()
    assert student(input_ids=ids, attention_mask=am).logits.shape == (2, 24, V)


def test_pruning_deberta_with_its_conv_layer_slices_the_conv_channels():
    """DeBERTa-v2's conv layer (conv_kernel_size > 0, as deberta-v2-xlarge) loses the pruned hidden channels on
    both its input and output axes; a grouped conv is refused naming it (fam-bugs 2)."""
    torch.manual_seed(0)
    config = config_of("deberta-v2", layers=3)
    config.conv_kernel_size, config.conv_act = 3, "gelu"
    teacher = T.AutoModelForMaskedLM.from_config(config).eval()
    same, _ = build_student(teacher, StudentConfig(layers=[0, 1, 2], init="prune"), _calibration())
    ids, am, _ = batch()
    with torch.no_grad():
        diff = same.eval()(input_ids=ids, attention_mask=am).logits - teacher(input_ids=ids, attention_mask=am).logits
    assert float(diff.abs().max()) <= 1e-5
    cfg = StudentConfig(layers=[0, 2], init="prune", hidden_size=16, num_attention_heads=2, intermediate_size=24)
    student, record = build_student(teacher, cfg, _calibration())
    ch = record["prune"]["hidden_channels"]
    key = "deberta.encoder.conv.conv.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key][ch][:, ch])
    config.conv_groups = 2
    grouped = T.AutoModelForMaskedLM.from_config(config).eval()
    with pytest.raises(ConfigError, match=r"encoder\.conv.*conv_groups=2"):
        build_student(grouped, cfg, _calibration())


def test_config_plan_shows_the_cadence_map_of_a_modernbert_teacher(tmp_path):
    """``python -m pretrain.config``'s plan resolves ``student.layers`` through the family adapter, as the run does:
    "cadence" on a 12-layer ModernBERT (global every 3) is [0, 2, 4, 6, 8, 11], not DistilBERT's [0, 2, 4, 7, 9, 11]."""
    from pretrain import config as C
    from pretrain import config_plan

    teacher = tmp_path / "teacher"
    tconf = modernbert_config(12)
    tconf.save_pretrained(teacher)
    raw = {
        "teacher": {"name_or_path": str(teacher)},
        "student": {"layers": "cadence"},
        "data": {"dir": str(tmp_path / "shards")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 10},
        "deepspeed": {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    lines, _ = config_plan.check_and_plan(C.load(path), 1)
    built = teacher_layer_map("cadence", tconf)
    assert built == [0, 2, 4, 6, 8, 11]
    assert f"student keeps teacher layers {built} of 12" in lines


def test_student_follows_the_teachers_attention_kernel(caplog):
    """The student runs the teacher's kernel: eager after an eager teacher, SDPA after an SDPA one; a family without
    SDPA stays eager; a flash_attention_2 teacher off CUDA / without flash_attn gives an SDPA student, said once."""
    families._SAID.clear()
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        teacher = T.AutoModelForMaskedLM.from_config(config_of("bert"), attn_implementation=impl)
        for cfg in (StudentConfig(layers=[0, 2]), StudentConfig(layers=[0, 2], init="random", hidden_size=16)):
            student, _ = build_student(teacher, cfg)
            assert student.config._attn_implementation == impl, (impl, cfg.init)
        pruned, _ = build_student(teacher, StudentConfig(layers=[0, 2], init="prune", hidden_size=16), _calibration())
        assert pruned.config._attn_implementation == impl
    deberta, _ = build_student(mlm_model("deberta-v2"), StudentConfig(layers=[0, 2]))
    assert deberta.config._attn_implementation == "eager"
    teacher = mlm_model("bert")
    teacher.config._attn_implementation = "flash_attention_2"  # as a GPU teacher loaded with FA2 reports it
    with caplog.at_level(logging.WARNING, logger="pretrain.families"):
        for _ in range(2):
            student, _ = build_student(teacher, StudentConfig(layers=[0, 2]))
            assert student.config._attn_implementation == "sdpa"
    said = [r.getMessage() for r in caplog.records if "flash_attention_2 unavailable" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("student BertForMaskedLM")
