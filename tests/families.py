"""Tiny random teachers of every encoder family the pipeline supports, each with a small tokenizer of its family's kind.

Nothing downloads: each model is built from its transformers config class (4 layers of width 32, ModernBERT 6 layers so
that its global / sliding cadence matters), and each tokenizer is made in this process with the `tokenizers` library:

- WordPiece (BERT, ELECTRA, DistilBERT; MPNet with its ``<s>`` specials): the frozen vocabulary of tests/tiny.py;
- byte-level BPE (RoBERTa; ModernBERT with its ``[CLS]`` specials; DeBERTa-v2 as DeBERTa's GPT-2 BPE): trained here;
- SentencePiece-like Unigram with Metaspace (``▁`` word starts; XLM-R, DeBERTa-v3): trained here.

:func:`teacher_dir` saves one family as a Hugging Face folder that ``AutoTokenizer`` / ``AutoModel`` (and
``AutoModelForMaskedLM`` when the family has an MLM head, ``SentenceTransformer`` for the ``st-*`` families) load.
The folders are built once per pytest session.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests import tiny

HIDDEN, HEADS, INTER, LAYERS = 32, 4, 64, 4
SEQ = 32  # max_seq_length of the family shards

WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
ROBERTA_SPECIALS = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"}
DEBERTA_SPECIALS = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
MODERNBERT_SPECIALS = {"unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of the matrix: how to build its tiny teacher and what it has.

    ``tokenizer``: "wordpiece", "bpe" or "unigram"; ``mlm``: the teacher has a trained MLM head (loaded with
    ``AutoModelForMaskedLM``); ``sentence``: a sentence-transformers model (mean pooling over the encoder);
    ``layers``: teacher depth."""

    name: str
    model_type: str
    tokenizer: str
    mlm: bool
    sentence: bool = False
    layers: int = LAYERS
    note: str = ""


FAMILIES = {
    f.name: f
    for f in (
        Family("bert", "bert", "wordpiece", True),
        Family("roberta", "roberta", "bpe", True),
        Family("xlm-roberta", "xlm-roberta", "unigram", True),
        Family("electra-discriminator", "electra", "wordpiece", False, note="ElectraForPreTraining: no MLM head"),
        Family("electra-generator", "electra", "wordpiece", True, note="embedding 16 -> hidden 32 projection"),
        Family("deberta-v2", "deberta-v2", "bpe", True, note="relative attention, conv layer"),
        Family("deberta-v3", "deberta-v2", "unigram", False, note="no trained MLM head (replaced-token detection)"),
        Family("mpnet", "mpnet", "wordpiece", True),
        Family("modernbert", "modernbert", "bpe", True, layers=6, note="global every 3rd layer, window 16"),
        Family("distilbert", "distilbert", "wordpiece", True),
        Family("st-bert", "bert", "wordpiece", False, sentence=True),
        Family("st-mpnet", "mpnet", "wordpiece", False, sentence=True, note="like all-mpnet-base-v2"),
    )
}


# ------------------------------------------------------------------------------------------------------ tokenizers
def _specials_of(model_type: str) -> dict[str, str]:
    if model_type in ("roberta", "xlm-roberta", "mpnet"):
        return ROBERTA_SPECIALS
    if model_type == "modernbert":
        return MODERNBERT_SPECIALS
    return DEBERTA_SPECIALS if model_type == "deberta-v2" else WORDPIECE_SPECIALS


@functools.cache
def _tokenizer_json(kind: str, specials: tuple[str, ...], unk: str) -> str:
    """A tokenizer.json of ``kind`` whose first ids are ``specials`` in order, ``unk`` the unknown token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":  # the frozen vocabulary of tests/tiny.py with this family's special tokens in front
        vocab = tiny.BERT_VOCAB.read_text(encoding="utf-8").splitlines()[5:]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate([*specials, *vocab])}, unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer: Any = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), initial_alphabet=alphabet)
        tok.train_from_iterator(tiny.corpus(), trainer)
    else:  # SentencePiece-like: Unigram pieces with the ▁ word-start marker
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=list(specials), unk_token=unk)
        tok.train_from_iterator(tiny.corpus(), trainer)
    return tok.to_str()


def make_tokenizer(family: Family):
    """The family's fast tokenizer (``PreTrainedTokenizerFast``), with ``[CLS] x [SEP]`` / ``<s> x </s>`` templates."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    sp = _specials_of(family.model_type)
    order = (sp["pad"], sp["unk"], sp["cls"], sp["sep"], sp["mask"])
    if sp is ROBERTA_SPECIALS:
        order = (sp["cls"], sp["pad"], sp["sep"], sp["unk"], sp["mask"])  # <s>=0 <pad>=1 </s>=2 as RoBERTa
    tok = Tokenizer.from_str(_tokenizer_json(family.tokenizer, order, sp["unk"]))
    cls, sep = sp["cls"], sp["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1" if sp is not ROBERTA_SPECIALS else f"{cls} $A {sep} {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    extra = {"bos_token": cls, "eos_token": sep} if sp is ROBERTA_SPECIALS else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=sp["unk"],
        pad_token=sp["pad"],
        cls_token=cls,
        sep_token=sep,
        mask_token=sp["mask"],
        model_max_length=SEQ * 4,
        **extra,
    )


# ---------------------------------------------------------------------------------------------------------- models
def _config(family: Family, tok) -> Any:
    """The family's transformers config: width 32, 4 heads, ``family.layers`` layers, the tokenizer's ids."""
    import transformers as tf

    ids = {"pad_token_id": tok.pad_token_id}
    common: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "num_hidden_layers": family.layers,
        "num_attention_heads": HEADS,
        "intermediate_size": INTER,
        **ids,
    }
    mt = family.model_type
    if mt == "bert":
        return tf.BertConfig(max_position_embeddings=128, **common)
    if mt in ("roberta", "xlm-roberta", "mpnet"):
        cls = {"roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig, "mpnet": tf.MPNetConfig}[mt]
        extra = {} if mt == "mpnet" else {"type_vocab_size": 1}
        return cls(max_position_embeddings=130, bos_token_id=0, eos_token_id=2, **extra, **common)
    if mt == "electra":
        embedding = 16 if family.mlm else HIDDEN
        return tf.ElectraConfig(embedding_size=embedding, max_position_embeddings=128, **common)
    if mt == "deberta-v2":
        v2 = family.name == "deberta-v2"
        relative: dict[str, Any] = {  # fields DebertaV2Config reads from **kwargs (not in its signature)
            "position_buckets": 16,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "conv_kernel_size": 3 if v2 else 0,
            "conv_act": "gelu",
        }
        return tf.DebertaV2Config(
            max_position_embeddings=128,
            relative_attention=True,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            type_vocab_size=0,
            **relative,
            **common,
        )
    if mt == "modernbert":
        cadence: dict[str, Any] = {"global_attn_every_n_layers": 3}  # read from **kwargs: layer_types
        return tf.ModernBertConfig(
            max_position_embeddings=128,
            **cadence,
            local_attention=16,
            cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            **common,
        )
    if mt == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=len(tok), dim=HIDDEN, n_layers=family.layers, n_heads=HEADS, hidden_dim=INTER, **ids
        )
    raise ValueError(f"no config for {family.name}")


def make_model(family: Family, tok=None, seed: int = 0):
    """The family's random teacher in eval mode: ``*ForMaskedLM`` when ``family.mlm``; ELECTRA's discriminator
    ``ElectraForPreTraining``; otherwise the bare encoder (``*Model``, no pooler)."""
    import torch
    import transformers as tf

    tok = tok or make_tokenizer(family)
    cfg = _config(family, tok)
    torch.manual_seed(seed)
    if family.name == "electra-discriminator":
        return tf.ElectraForPreTraining(cfg).eval()
    if family.mlm:
        return tf.AutoModelForMaskedLM.from_config(cfg).eval()
    model = tf.AutoModel.from_config(cfg)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # a sentence encoder's checkpoint without pooler weights
    return model.eval()


def _sentence_files(folder: Path) -> None:
    """modules.json, sentence_bert_config.json and a mean-pooling 1_Pooling/config.json next to the encoder."""
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": SEQ, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True})
    )


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="families-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def teacher_dir(name: str) -> Path:
    """The family ``name``'s teacher saved as a Hugging Face folder (once per session); sentence files for ``st-*``."""
    family = FAMILIES[name]
    tok = make_tokenizer(family)
    folder = tiny.save_model_dir(_root() / name, make_model(family, tok), tok)
    if family.sentence:
        _sentence_files(folder)
    return folder


@functools.cache
def shards(name: str) -> Path:
    """Shards of tests/tiny.py's corpus made with the family's tokenizer by ``python -m data_prep prepare`` (in this
    process), max_seq_length :data:`SEQ`, 15% valid."""
    import contextlib
    import io

    from data_prep.__main__ import main as data_prep_main

    root = _root()
    text = root / "corpus.txt"
    if not text.is_file():
        lines = tiny.corpus(1)
        docs = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))]
        text.write_text("\n\n".join(docs * 4) + "\n")
    out = root / f"shards-{name}"
    argv = ["prepare", "--source", f"text:{text}", "--tokenizer", str(teacher_dir(name))]
    argv += ["--max-seq-length", str(SEQ), "--output", str(out), "--valid-fraction", "0.15"]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = data_prep_main([*argv, "--num-proc", "0", "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"data_prep prepare failed for {name} (exit {rc})")
    return out
