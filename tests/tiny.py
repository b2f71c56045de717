"""Tiny real models and tokenizers for tests: random BERT / RoBERTa configs and tokenizers trained in-process.

Nothing here downloads: the tokenizers are trained with the `tokenizers` library on a few paragraphs of English, so
tests exercise the same code paths as hub models (fast tokenizers, special ids, save/load with the Auto classes).
"""

from __future__ import annotations

import functools
from pathlib import Path

TEXT = """The quick brown fox jumps over the lazy dog. A distilled model keeps most of its teacher's accuracy.
Knowledge distillation trains a small student to match the outputs of a large teacher network.
Wikipedia is a free online encyclopedia written and maintained by a community of volunteers.
Shakespeare wrote thirty-eight plays, among them comedies, histories and tragedies.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.
The masked language model predicts tokens that were hidden from the input sequence.
Training with very large batches needs gradient accumulation over many micro-batches.
Paris is the capital of France, and Berlin is the capital of Germany.
Water boils at one hundred degrees Celsius at sea level; ice melts at zero degrees.
""".splitlines()


def corpus(repeat: int = 20) -> list[str]:
    """A small English corpus: the lines above, repeated (list of str)."""
    return [line for _ in range(repeat) for line in TEXT if line.strip()]


# The WordPiece trainer of `tokenizers` breaks ties between equally frequent pairs in hash order, so its vocabulary
# changes from one process to the next (366 to 369 tokens at vocab_size 400). The default tokenizer uses this file
# instead: one output of that same trainer (vocab_size 400 on corpus()), one token per line in id order.
BERT_VOCAB = Path(__file__).with_name("tiny_bert_vocab.txt")


@functools.cache
def _bert_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab_size == 400:
        tok = Tokenizer(models.WordPiece(models.WordPiece.read_file(str(BERT_VOCAB)), unk_token="[UNK]"))
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if vocab_size != 400:
        tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece()
    return tok.to_str()


@functools.cache
def _roberta_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def bert_tokenizer(vocab_size: int = 400):
    """A WordPiece BertTokenizerFast trained on :func:`corpus` ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4); the default
    size reads the frozen vocabulary :data:`BERT_VOCAB` (the same in every process), other sizes are trained here."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bert_tokenizer_json(vocab_size)),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def roberta_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer like RoBERTa's (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), trained on :func:`corpus`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_roberta_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_max_length=512,
    )


def bert_model(tokenizer=None, *, layers: int = 4, hidden: int = 32, heads: int = 4, mlm: bool = True, seed: int = 0):
    """A random BertForMaskedLM (or BertModel when ``mlm=False``) for ``tokenizer``'s vocabulary, in eval mode."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tokenizer = tokenizer or bert_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (BertForMaskedLM(cfg) if mlm else BertModel(cfg, add_pooling_layer=False)).eval()


def roberta_model(
    tokenizer=None, *, layers: int = 4, hidden: int = 32, heads: int = 4, mlm: bool = True, seed: int = 0
):
    """A random RobertaForMaskedLM (or RobertaModel) for ``tokenizer``'s vocabulary, in eval mode."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    tokenizer = tokenizer or roberta_tokenizer()
    cfg = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    torch.manual_seed(seed)
    return (RobertaForMaskedLM(cfg) if mlm else RobertaModel(cfg, add_pooling_layer=False)).eval()


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """Save ``model`` and ``tokenizer`` as a Hugging Face directory (loads with the Auto classes); returns the path."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
