"""Kill tests for the mutants of pretrain/prune.py that test_prune.py lets survive (docs/testing.md "Mutation
testing"; every survivor and its verdict in docs/mutants-prune.md).

Each test checks values worked out independently here: the calibration sample against a hand collation of shards
written here (seeded draw, micro-batch size, pad id, padding multiple, device); the per-sequence mean, top-k ties and
the sample digest on hand values; fused-axis and state-dict slicing on hand tensors; the importance of a BERT and a
ModernBERT teacher against a float64 reference from hooks written here (Minitron's measures, mean over real tokens
then over sequences); the pruned students' selections, sliced tensors, config fields and record against that
reference; the refusals (grouped conv, pruned heads, a block without the layout, a lost tie, MPNet's shared heads).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.shards import ShardWriter
from pretrain import prune
from pretrain.families import BERT_PRUNE, MODERNBERT_PRUNE
from tests import tiny

SEQS = [np.arange(10 + 10 * i, 10 + 10 * i + 1 + i % 5, dtype=np.uint16) for i in range(40)]  # lengths 1..5


def _shard_dir(directory: Path, tokenizer: dict) -> Path:
    """A prepared directory holding :data:`SEQS` as its train split (shards of about 16 tokens)."""
    directory.mkdir()
    w = ShardWriter(directory, "train", np.dtype(np.uint16), 16)
    for s in SEQS:
        w.write(s)
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": tokenizer,
        "splits": {"train": shards.split_summary(w.close(), len(SEQS))},
    }
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune-shards")
    return (
        _shard_dir(root / "pad7", {"pad_token_id": 7, "sep_token_id": 2, "vocab_size": 1000}),
        _shard_dir(root / "nopad", {"sep_token_id": 2, "vocab_size": 1000}),
    )


def _collated(picks, pad: int, multiple: int) -> dict[str, torch.Tensor]:
    """The micro-batch of SEQS[picks] written out by hand: right-padded with ``pad`` to a multiple of ``multiple``."""
    longest = max(len(SEQS[i]) for i in picks)
    length = -(-longest // multiple) * multiple
    ids = torch.full((len(picks), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(picks), length), dtype=torch.int64)
    for r, i in enumerate(picks):
        ids[r, : len(SEQS[i])] = torch.tensor(SEQS[i].astype(np.int64))
        mask[r, : len(SEQS[i])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == torch.int64 and torch.equal(g[k], w[k]), k


def test_calibration_sample_is_the_seeded_draw_collated_by_hand(shard_dirs):
    pad7, nopad = shard_dirs
    pick = np.sort(np.random.default_rng(3).choice(40, size=35, replace=False)).tolist()
    assert len(set(pick)) == 35
    # defaults: micro-batches of 32, padded with the manifest's pad id to a multiple of 8
    _same(prune.calibration_batches(pad7, n=35, seed=3), [_collated(pick[:32], 7, 8), _collated(pick[32:], 7, 8)])
    # explicit batch size and multiple; the explicit pad id wins over the manifest's
    _same(
        prune.calibration_batches(pad7, n=35, seed=3, batch_size=20, multiple=3, pad_id=5),
        [_collated(pick[:20], 5, 3), _collated(pick[20:], 5, 3)],
    )
    # a manifest without a pad id pads with 0
    _same(
        prune.calibration_batches(nopad, n=35, seed=3, multiple=16),
        [_collated(pick[:32], 0, 16), _collated(pick[32:], 0, 16)],
    )
    # n = 1 is a valid sample; n >= the split's size takes every sequence in order
    _same(
        prune.calibration_batches(pad7, n=1, seed=3),
        [_collated(np.random.default_rng(3).choice(40, 1, replace=False).tolist(), 7, 8)],
    )
    every = [_collated(list(range(32)), 7, 8), _collated(list(range(32, 40)), 7, 8)]
    _same(prune.calibration_batches(pad7, n=40, seed=3), every)
    _same(prune.calibration_batches(pad7, n=50, seed=3), every)


def test_calibration_sample_goes_to_the_device_asked_for(shard_dirs):
    got = prune.calibration_batches(shard_dirs[0], n=3, seed=0, device="meta")
    assert [v.device.type for b in got for v in b.values()] == ["meta", "meta"]
    got = prune.calibration_batches(shard_dirs[0], n=3, seed=0)
    assert [v.device.type for b in got for v in b.values()] == ["cpu", "cpu"]


def test_sequence_mean_over_real_tokens_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]], [[5.0, -6.0], [70.0, 80.0], [90.0, 10.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(prune._seq_mean(x, mask), torch.tensor([[2.0, 3.0], [5.0, -6.0]]))
    assert torch.equal(prune._seq_mean(x[..., 0], mask), torch.tensor([2.0, 5.0]))  # [B, L]: no trailing axes


def test_top_k_ties_go_to_the_lower_index_beyond_the_small_sort():
    # 32 equal scores: torch's unstable sort returns another order from 17 elements on
    assert prune.top_k(torch.zeros(32), 4) == [0, 1, 2, 3]
    scores = torch.tensor([1.0, 2.0] * 20)
    assert prune.top_k(scores, 5) == [1, 3, 5, 7, 9]


def _selection() -> prune.Selection:
    return prune.Selection(layer_map=[2], channels=[1, 3], heads=[[1]], neurons=[[0, 2]])


def test_fused_axes_cut_the_same_indices_in_every_block():
    sel = _selection()  # head_dim 2: kept head 1 -> attention channels 2, 3 of each 4-row block
    wqkv = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)  # Q | K | V, 2 heads x 2 channels each
    got, names = prune._slice_axes("layers.0.attn.Wqkv.weight", wqkv, ("A3", "H"), 0, sel, 2)
    assert torch.equal(got, wqkv[[2, 3, 6, 7, 10, 11]][:, [1, 3]])
    assert names == ["heads[1] x3", "channels"]
    wi = torch.arange(8, dtype=torch.float32)  # input | gate, 4 neurons each
    got, names = prune._slice_axes("layers.0.mlp.Wi.bias", wi, ("F2",), 0, sel, 2)
    assert torch.equal(got, torch.tensor([0.0, 2.0, 4.0, 6.0])) and names == ["neurons x2"]
    got, names = prune._slice_axes("emb.weight", wqkv, (None, "H"), None, sel, 2)
    assert torch.equal(got, wqkv[:, [1, 3]]) and names == [":", "channels"]


def test_state_slicing_by_hand_with_a_family_layout_and_whole_copies():
    sel = _selection()
    t = {
        "model.layers.2.attn.Wqkv.weight": torch.arange(48, dtype=torch.float64).reshape(12, 4),
        "model.extra_buffer": torch.arange(5, dtype=torch.float64),  # no rule: copied whole
        "model.layers.2.attn.Wo.weight": torch.arange(16, dtype=torch.float64).reshape(4, 4),
    }
    shapes = {
        "model.extra_buffer": (5,),
        "model.layers.0.attn.Wqkv.weight": (6, 2),
        "model.layers.0.attn.Wo.weight": (2, 2),
    }
    state, copied = prune.slice_state(t, shapes, "model.layers", sel, 2, MODERNBERT_PRUNE)
    assert list(state) == list(shapes)  # every student tensor, the unruled one first did not end the loop
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["model.extra_buffer"], t["model.extra_buffer"].float())
    assert state["model.extra_buffer"].data_ptr() != t["model.extra_buffer"].data_ptr()
    assert torch.equal(
        state["model.layers.0.attn.Wqkv.weight"],
        t["model.layers.2.attn.Wqkv.weight"][[2, 3, 6, 7, 10, 11]][:, [1, 3]].float(),
    )
    assert torch.equal(
        state["model.layers.0.attn.Wo.weight"], t["model.layers.2.attn.Wo.weight"][[1, 3]][:, [2, 3]].float()
    )
    assert copied == {
        "model.extra_buffer": "model.extra_buffer",
        "model.layers.0.attn.Wqkv.weight": "model.layers.2.attn.Wqkv.weight[heads[1] x3, channels]",
        "model.layers.0.attn.Wo.weight": "model.layers.2.attn.Wo.weight[channels, heads[1]]",
    }
    # BERT's rules do not name ModernBERT's fused tensor: without its layout the slice is refused
    with pytest.raises(ValueError, match="no slicing rule"):
        prune.slice_state(t, shapes, "model.layers", sel, 2, BERT_PRUNE)
    # an unruled tensor of another shape, an A axis outside the layer list: refused, naming the tensor
    with pytest.raises(ValueError, match=r"model\.extra_buffer \(4,\): no slicing rule"):
        prune.slice_state(t, {"model.extra_buffer": (4,)}, "model.layers", sel, 2, MODERNBERT_PRUNE)
    outside = {"top.attention.self.query.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"^top\.attention\.self\.query\.bias: role A outside a layer"):
        prune.slice_state(outside, {"top.attention.self.query.bias": (2,)}, "model.layers", sel, 2)


def test_sample_digest_is_the_sha256_of_the_real_int64_ids():
    batches = [
        {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])},
        {"input_ids": torch.tensor([[8, 9, 10]]), "attention_mask": torch.tensor([[1, 1, 1]])},
    ]
    h = hashlib.sha256()
    for row in ([5, 6], [7], [8, 9, 10]):
        h.update(np.array(row, dtype=np.int64).tobytes())
    assert prune._sample_digest(batches) == (3, 6, h.hexdigest())


# ------------------------------------------------------------------------------------------------ importance, build
def _cal(vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two padded micro-batches of random ids (pad 0); one sequence has a single real token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([9, 5, 1], [7, 12, 3, 2]):
        ids = torch.randint(5, vocab, (len(lengths), 12), generator=g)
        mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _reference_importance(model, cal, blocks, layers, heads_in, neurons_in, n_heads, emb_norm):
    """Minitron's measures computed here in float64 from hooks on the named modules: per token, the L2 norm of each
    head's slice of ``heads_in``'s input, |``neurons_in``'s input| and |output| of every nn.LayerNorm of the mapped
    blocks and of ``emb_norm``; mean over a sequence's real tokens, then over the sequences."""
    seen: list[tuple[str, int, torch.Tensor]] = []
    hooks = [emb_norm.register_forward_hook(lambda _m, _a, o: seen.append(("ch", -1, o)))]
    for t in layers:
        block = blocks[t]
        hooks.append(
            block.get_submodule(heads_in).register_forward_pre_hook(lambda _m, a, t=t: seen.append(("h", t, a[0])))
        )
        hooks.append(
            block.get_submodule(neurons_in).register_forward_pre_hook(lambda _m, a, t=t: seen.append(("n", t, a[0])))
        )
        for m in block.modules():
            if isinstance(m, torch.nn.LayerNorm):
                hooks.append(m.register_forward_hook(lambda _m, _a, o: seen.append(("ch", -1, o))))
    heads = {t: torch.zeros(n_heads, dtype=torch.float64) for t in layers}
    neurons: dict[int, torch.Tensor] = {}
    channels = torch.zeros(0, dtype=torch.float64)
    n_seq = 0
    with torch.no_grad():
        for b in cal:
            seen.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            m = b["attention_mask"].double()
            n_seq += len(m)
            for kind, t, x in seen:
                x = x.double()
                v = x.reshape(*x.shape[:2], n_heads, -1).pow(2).sum(-1).sqrt() if kind == "h" else x.abs()
                per_seq = (v * m[..., None]).sum(1) / m.sum(1)[:, None]
                if kind == "h":
                    heads[t] += per_seq.sum(0)
                elif kind == "n":
                    neurons[t] = neurons.get(t, 0) + per_seq.sum(0)
                else:
                    channels = channels + per_seq.sum(0) if len(channels) else per_seq.sum(0)
    for h in hooks:
        h.remove()
    return (
        {t: v / n_seq for t, v in heads.items()},
        {t: v / n_seq for t, v in neurons.items()},
        channels / n_seq,
    )


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k])


@pytest.fixture(scope="module")
def bert(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=3)  # hidden 32, 4 heads of 8, 128 neurons
    teacher.set_attn_implementation("eager")
    return teacher


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # fp32 sums vs float64


def _bert_reference_importance(bert, cal, layers):
    """:func:`_reference_importance` of the tiny BERT fixture (4 heads; heads at the attention output projection,
    neurons at the feed-forward output projection, the embeddings' LayerNorm)."""
    return _reference_importance(
        bert,
        cal,
        bert.bert.encoder.layer,
        layers,
        "attention.output.dense",
        "output.dense",
        4,
        bert.bert.embeddings.LayerNorm,
    )


def test_bert_importance_matches_a_hand_reference(bert):
    cal = _cal(bert.config.vocab_size)
    imp = prune.compute_importance(bert, cal, [0, 2])
    heads, neurons, channels = _bert_reference_importance(bert, cal, [0, 2])
    assert sorted(imp.heads) == [0, 2] and sorted(imp.neurons) == [0, 2]
    for t in (0, 2):
        _close(imp.heads[t], heads[t])
        _close(imp.neurons[t], neurons[t])
    _close(imp.channels, channels)
    assert (imp.sequences, imp.tokens, imp.sha256) == prune._sample_digest(cal) and imp.tokens == 39


@pytest.fixture(scope="module")
def modernbert():
    import transformers as tf

    cadence: dict[str, Any] = {"global_attn_every_n_layers": 3}  # read from **kwargs: layer_types
    config = tf.ModernBertConfig(
        **cadence,
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        local_attention=16,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return tf.ModernBertForMaskedLM(config).eval()


def test_modernbert_importance_uses_its_layout_and_skips_the_identity_norm(modernbert):
    cal = _cal(100)
    imp = prune.compute_importance(modernbert, cal, [0, 1])
    heads, neurons, channels = _reference_importance(
        modernbert, cal, modernbert.model.layers, [0, 1], "attn.Wo", "mlp.Wo", 4, modernbert.model.embeddings.norm
    )
    assert isinstance(modernbert.model.layers[0].attn_norm, torch.nn.Identity)
    for t in (0, 1):
        _close(imp.heads[t], heads[t])
        _close(imp.neurons[t], neurons[t])
    _close(imp.channels, channels)


def test_modernbert_build_slices_the_fused_tensors_and_remaps_layer_types(modernbert):
    cal = _cal(100)
    student, record = prune.build_pruned(modernbert, [1, 2], cal, hidden_size=16, intermediate_size=40)
    sc = student.config
    assert (sc.hidden_size, sc.num_attention_heads, sc.intermediate_size, sc.num_hidden_layers) == (16, 2, 40, 2)
    assert sc.layer_types == ["sliding_attention", "sliding_attention"]  # the teacher's layers 1 and 2
    heads, neurons, channels = _reference_importance(
        modernbert, cal, modernbert.model.layers, [1, 2], "attn.Wo", "mlp.Wo", 4, modernbert.model.embeddings.norm
    )
    ch = _top(channels, 16)
    p = record["prune"]
    assert p["hidden_channels"] == ch
    t, s = modernbert.state_dict(), student.state_dict()
    for i, tl in enumerate([1, 2]):
        kept, nk = _top(heads[tl], 2), _top(neurons[tl], 40)
        assert p["heads"][i] == kept and p["neurons"][i] == nk
        rows = [part * 32 + h * 8 + j for part in range(3) for h in kept for j in range(8)]
        w = t[f"model.layers.{tl}.attn.Wqkv.weight"]
        assert torch.equal(s[f"model.layers.{i}.attn.Wqkv.weight"], w[rows][:, ch])
        wi = t[f"model.layers.{tl}.mlp.Wi.weight"]
        assert torch.equal(s[f"model.layers.{i}.mlp.Wi.weight"], wi[nk + [64 + n for n in nk]][:, ch])
        assert torch.equal(s[f"model.layers.{i}.mlp.Wo.weight"], t[f"model.layers.{tl}.mlp.Wo.weight"][ch][:, nk])
    assert torch.equal(s["head.dense.weight"], t["head.dense.weight"][ch][:, ch])


def test_bert_build_record_by_hand(bert):
    cal = _cal(bert.config.vocab_size, seed=1)
    student, record = prune.build_pruned(bert, [0, 2], cal, hidden_size=16, intermediate_size=48)
    heads, neurons, channels = _bert_reference_importance(bert, cal, [0, 2])
    imp = prune.compute_importance(bert, cal, [0, 2])
    ch = _top(channels, 16)
    assert student.config._attn_implementation == "eager"  # the teacher's kernel, not the SDPA default
    assert student.pruned_hidden_channels == ch
    assert set(record) == {"layer_map", "copied", "initialized", "notes", "prune"}
    assert record["layer_map"] == [0, 2] and record["initialized"] == []
    assert set(record["copied"]) == set(student.state_dict())
    assert record["notes"] == [
        "pruned (Minitron): 2 of 3 layers, hidden 32 -> 16, heads 4 -> 2 (head size 8), intermediate 128 -> 48; "
        "importance on 7 calibration sequences (39 tokens)"
    ]

    def scores(v: torch.Tensor) -> list[float]:
        return [float(f"{x:.6g}") for x in v.tolist()]

    assert record["prune"] == {
        "method": prune.METHOD,
        "calibration": {
            "sequences": 7,
            "tokens": 39,
            "sha256": prune._sample_digest(cal)[2],
            "source": "train split of data.dir, drawn with train.seed",
        },
        "hidden_size": [32, 16],
        "num_attention_heads": [4, 2],
        "intermediate_size": [128, 48],
        "hidden_channels": ch,
        "heads": [_top(heads[0], 2), _top(heads[2], 2)],
        "neurons": [_top(neurons[0], 48), _top(neurons[2], 48)],
        "scores": {
            "hidden_channels": scores(imp.channels),
            "heads": [scores(imp.heads[0]), scores(imp.heads[2])],
            "neurons": [scores(imp.neurons[0]), scores(imp.neurons[2])],
        },
    }
    assert record["prune"]["method"].startswith("Minitron activation importance")
    torch.testing.assert_close(
        torch.tensor(record["prune"]["scores"]["hidden_channels"]).double(), channels, rtol=1e-5, atol=1e-6
    )


def _hand_bert_state(t: dict[str, torch.Tensor], ch, layer_map, heads, neurons) -> dict[str, torch.Tensor]:
    """A pruned BertForMaskedLM's state dict sliced here tensor by tensor (head size 8)."""
    out = {}
    for i, tl in enumerate(layer_map):
        att = [h * 8 + j for h in heads[i] for j in range(8)]
        nk = neurons[i]
        a, b = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{tl}."
        for qkv in ("query", "key", "value"):
            out[a + f"attention.self.{qkv}.weight"] = t[b + f"attention.self.{qkv}.weight"][att][:, ch]
            out[a + f"attention.self.{qkv}.bias"] = t[b + f"attention.self.{qkv}.bias"][att]
        out[a + "attention.output.dense.weight"] = t[b + "attention.output.dense.weight"][ch][:, att]
        out[a + "intermediate.dense.weight"] = t[b + "intermediate.dense.weight"][nk][:, ch]
        out[a + "intermediate.dense.bias"] = t[b + "intermediate.dense.bias"][nk]
        out[a + "output.dense.weight"] = t[b + "output.dense.weight"][ch][:, nk]
        for name in ("attention.output.dense.bias", "output.dense.bias"):
            out[a + name] = t[b + name][ch]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[a + ln + ".weight"], out[a + ln + ".bias"] = t[b + ln + ".weight"][ch], t[b + ln + ".bias"][ch]
    for kind in ("word", "position", "token_type"):
        out[f"bert.embeddings.{kind}_embeddings.weight"] = t[f"bert.embeddings.{kind}_embeddings.weight"][:, ch]
    for name in ("bert.embeddings.LayerNorm", "cls.predictions.transform.LayerNorm"):
        out[name + ".weight"], out[name + ".bias"] = t[name + ".weight"][ch], t[name + ".bias"][ch]
    out["cls.predictions.transform.dense.weight"] = t["cls.predictions.transform.dense.weight"][ch][:, ch]
    out["cls.predictions.transform.dense.bias"] = t["cls.predictions.transform.dense.bias"][ch]
    out["cls.predictions.bias"] = t["cls.predictions.bias"]
    return out


def test_bert_student_equals_a_reference_sliced_by_hand(bert):
    from transformers import BertConfig, BertForMaskedLM

    cal = _cal(bert.config.vocab_size, seed=2)
    student, record = prune.build_pruned(bert, [1, 2], cal, hidden_size=16, intermediate_size=40)
    heads, neurons, channels = _bert_reference_importance(bert, cal, [1, 2])
    ch = _top(channels, 16)
    kept = [_top(heads[t], 2) for t in (1, 2)]
    nk = [_top(neurons[t], 40) for t in (1, 2)]
    hand = _hand_bert_state(bert.state_dict(), ch, [1, 2], kept, nk)
    config = BertConfig(
        vocab_size=bert.config.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=128,
        pad_token_id=bert.config.pad_token_id,
    )
    reference = BertForMaskedLM(config).eval()
    reference.set_attn_implementation("eager")  # the student's kernel (the teacher's)
    missing, unexpected = reference.load_state_dict(hand, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    reference.tie_weights()  # the decoder: the word embeddings and cls.predictions.bias
    s = student.state_dict()
    assert all(torch.equal(s[k], v) for k, v in hand.items())
    b = cal[1]
    with torch.no_grad():
        got = student.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        want = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(got, want)
    assert record["prune"]["heads"] == kept and record["prune"]["neurons"] == nk


def test_a_pooler_less_encoder_gives_a_pooler_less_student(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=2, mlm=False)
    student, record = prune.build_pruned(teacher, [1], _cal(len(bert_tok)), hidden_size=16)
    assert student.pooler is None and not any(k.startswith("pooler") for k in record["copied"])


def test_electra_embedding_size_follows_the_hidden_size():
    import transformers as tf

    config = tf.ElectraConfig(
        vocab_size=60,
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    teacher = tf.ElectraModel(config).eval()
    student, _ = prune.build_pruned(teacher, [0, 1], _cal(60), hidden_size=16)
    assert (student.config.embedding_size, student.config.hidden_size) == (16, 16)
    assert not hasattr(student, "embeddings_project")


def test_mpnet_prunes_its_feed_forward_only():
    import transformers as tf

    config = tf.MPNetConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    teacher = tf.MPNetForMaskedLM(config).eval()
    student, record = prune.build_pruned(teacher, [0, 1], _cal(60), intermediate_size=32)
    assert (student.config.num_attention_heads, student.config.intermediate_size) == (4, 32)
    assert record["prune"]["heads"] == [[0, 1, 2, 3]] * 2
    with pytest.raises(prune.ConfigError, match=r"student\.num_attention_heads: the mpnet family cannot drop heads"):
        prune.build_pruned(teacher, [0, 1], _cal(60), hidden_size=16)


def _config(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(hidden_size=32, num_attention_heads=4, intermediate_size=64, **kw)


def test_prunable_teacher_configs_by_hand():
    assert prune.resolve_targets(_config(embedding_size=32), 16, None, None) == (16, 2, 32)
    assert prune.resolve_targets(_config(conv_kernel_size=0, conv_groups=2), 16, None, None) == (16, 2, 32)
    assert prune.resolve_targets(_config(conv_groups=2), 16, None, None) == (16, 2, 32)  # no conv layer
    assert prune.resolve_targets(_config(conv_kernel_size=3), 16, None, None) == (16, 2, 32)  # ungrouped
    assert prune.resolve_targets(_config(conv_kernel_size=3, conv_groups=1, pruned_heads={}), 16, None, 40) == (
        16,
        2,
        40,
    )
    with pytest.raises(prune.ConfigError, match=r"grouped conv layer \(encoder\.conv, conv_groups=2\)"):
        prune.resolve_targets(_config(conv_kernel_size=3, conv_groups=2), 16, None, None)
    with pytest.raises(prune.ConfigError, match=r"already has pruned heads"):
        prune.resolve_targets(_config(pruned_heads={1: [0]}), 16, None, None)


def test_a_block_without_the_layout_is_refused_naming_what_is_missing():
    with pytest.raises(prune.ConfigError, match=r"student\.init: 'prune' needs the block layout .*Linear has no \["):
        prune.block_parts(torch.nn.Linear(2, 2))


def test_a_lost_tie_is_refused(bert_tok):
    teacher = tiny.bert_model(bert_tok, layers=1)
    untied = tiny.bert_model(bert_tok, layers=1)
    untied.cls.predictions.decoder.weight = torch.nn.Parameter(untied.cls.predictions.decoder.weight.detach().clone())
    prune._check_tie(teacher, teacher)
    prune._check_tie(untied, untied)  # an untied teacher may have an untied student
    with pytest.raises(ValueError, match="lost the tie"):
        prune._check_tie(teacher, untied)
