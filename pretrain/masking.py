"""Dynamic MLM masking per micro-batch, deterministic from (seed, step, rank, micro-step).

Follows DistilBERT's distiller (Hugging Face ``examples/research_projects/distillation/distiller.py``,
``prepare_batch_mlm``): per micro-batch exactly ``ceil(mlm_mask_prop * n)`` tokens are selected, where ``n`` counts the
real tokens, the non-special, non-pad ones, which are also the only ones that can be selected; sampled without
replacement with probability ``p(token) ∝ max(count, 1) ** -mlm_smoothing`` (XLM's frequency smoothing, Lample & Conneau
2019; DistilBERT uses 0.7); of the selected, ``word_mask`` become the mask token, ``word_rand`` a random non-special
token and ``word_keep`` stay (BERT's 80/10/10, Devlin et al. 2019).

Where the reference differs: its ``n`` is every non-pad token, [CLS] / [SEP] included (``lengths.sum()``), while
special tokens still cannot be selected (train.py gives them probability 0), so it selects about 0.15 x 2 = 0.3
more tokens per sequence with two special tokens (+0.4% at 512 tokens); its random replacements are drawn from the
whole vocabulary, special tokens included; and in fp16 it rounds the selected count down to a multiple of 8.

Sampling without replacement is done with Gumbel top-k (Efraimidis & Spirakis 2006; Kool et al. 2019): the selected
tokens are the ``n_tgt`` largest ``log p + Gumbel`` keys. That is the same distribution as ``torch.multinomial(p, n_tgt,
replacement=False)`` but the count stays a device tensor, so there is no host sync at all.
Whole-word masking applies the same to words (a word's key uses its rarest piece's probability) and takes whole words
in key order until at least ``n_tgt`` tokens are selected (at most one word's length - 1 more).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pretrain.schema import check, param


@dataclasses.dataclass
class MaskingConfig:
    """Dynamic masking of each micro-batch (BERT / DistilBERT MLM)."""

    mlm_mask_prop: float = param(
        0.15,
        help="Fraction of a micro-batch's non-special, non-pad tokens selected for prediction: ceil(0.15 x "
        "their number); special tokens are neither counted nor selected. 0.15 as in BERT and DistilBERT; "
        "DistilBERT's distiller.py counts [CLS] / [SEP] in that number (still selecting only non-special "
        "tokens): +0.4% selected at 512 tokens per sequence.",
    )
    word_mask: float = param(0.8, help="Fraction of the selected tokens replaced by the mask token (BERT: 0.8).")
    word_keep: float = param(0.1, help="Fraction of the selected tokens left unchanged (BERT: 0.1).")
    word_rand: float = param(
        0.1,
        help="Fraction of the selected tokens replaced by a uniformly random non-special "
        "token (BERT: 0.1; DistilBERT's distiller.py draws from the whole vocabulary, "
        "special tokens included).",
    )
    mlm_smoothing: float = param(
        0.7,
        help="Selection probability ∝ max(count, 1) ** -mlm_smoothing over the train split's token counts "
        "(0.7 as in XLM and DistilBERT; 0 = uniform).",
    )
    whole_word_mask: bool = param(
        False,
        help="Select whole words (all WordPiece / byte-level BPE pieces of a word together) instead of single tokens.",
    )

    def validate(self) -> None:
        """Check ranges; raises :class:`ConfigError` naming ``masking.<key>``."""
        check(
            0.0 < self.mlm_mask_prop <= 1.0,
            "masking.mlm_mask_prop",
            f"{self.mlm_mask_prop} must be in (0, 1]; 0.15 is the usual value",
        )
        for key in ("word_mask", "word_keep", "word_rand"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, f"masking.{key}", f"{value} must be in [0, 1]")
        total = self.word_mask + self.word_keep + self.word_rand
        check(
            abs(total - 1.0) < 1e-6,
            "masking.word_mask",
            f"word_mask + word_keep + word_rand = {total:g}, must be 1 (for example 0.8, 0.1, 0.1)",
        )
        check(
            0.0 <= self.mlm_smoothing < float("inf"),
            "masking.mlm_smoothing",
            f"{self.mlm_smoothing} must be a finite number >= 0 (0.7 as in DistilBERT; 0 = uniform)",
        )


def word_starts_from_tokens(tokens: list[str | None]) -> np.ndarray:
    """Per vocabulary id: does this token start a word? (bool array, shape [vocab]).

    WordPiece (BERT): a token starts a word unless it begins with ``##``. Byte-level BPE (RoBERTa, GPT-2): it
    starts a word when it begins with ``Ġ`` (an encoded space). SentencePiece (XLM-R): when it begins with ``▁``.
    The scheme is the one whose marker the vocabulary uses most. Positions right after a special token or padding are
    word starts whatever the token (see :class:`Masker`). Raises ``ValueError`` when no marker is found.
    """
    toks = [t or "" for t in tokens]
    counts = {m: sum(t.startswith(m) for t in toks) for m in ("##", "Ġ", "▁")}
    marker = max(counts, key=lambda m: counts[m])
    if counts[marker] == 0:
        raise ValueError(
            "whole-word masking: cannot tell word boundaries from this vocabulary (no '##', 'Ġ' or '▁' "
            "tokens); set masking.whole_word_mask=false"
        )
    if marker == "##":
        return np.array([not t.startswith("##") for t in toks], dtype=bool)
    return np.array([t.startswith(marker) for t in toks], dtype=bool)


def _seed(seed: int, step: int, rank: int, micro_step: int) -> int:
    """A 63-bit generator seed mixing (seed, step, rank, micro_step) (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(micro_step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Masker:
    """Masks micro-batches of token ids for MLM; see the module docstring for the method.

    Args:
        cfg: the masking section, validated when the run config was loaded (trusted here).
        vocab_size: number of token ids (``len(tokenizer)``); ids in batches must be below it.
        special_ids: ids never selected (CLS, SEP, PAD, MASK, UNK, ...) and never used as random replacements.
        mask_token_id, pad_token_id: the tokenizer's mask and pad ids.
        token_counts: int array [vocab_size] of counts over the train split (``token_counts.npy``); None = uniform.
        seed: the run's seed; each call mixes in (step, rank, micro_step).
        word_start: bool array [vocab_size] (:func:`word_starts_from_tokens`), needed for whole-word masking.

    Raises ``ValueError`` for a ``token_counts`` / ``word_start`` of the wrong length or whole-word masking without
    ``word_start``.
    """

    def __init__(
        self,
        cfg: MaskingConfig,
        *,
        vocab_size: int,
        special_ids,
        mask_token_id: int,
        pad_token_id: int,
        token_counts=None,
        seed: int = 0,
        word_start=None,
    ):
        self.cfg, self.vocab_size, self.seed = cfg, int(vocab_size), int(seed)
        self.mask_token_id, self.pad_token_id = int(mask_token_id), int(pad_token_id)
        special = np.zeros(self.vocab_size, dtype=bool)
        special[[int(i) for i in special_ids if i is not None]] = True
        special[[self.mask_token_id, self.pad_token_id]] = True
        if token_counts is None:
            probs = np.ones(self.vocab_size, dtype=np.float64)
        else:
            counts = np.asarray(token_counts)
            if counts.shape != (self.vocab_size,):
                raise ValueError(
                    f"token_counts has shape {counts.shape} but the tokenizer has {self.vocab_size} ids; "
                    f"prepare the shards with this tokenizer (data_prep) or pass the matching counts"
                )
            probs = np.maximum(counts.astype(np.float64), 1.0) ** -cfg.mlm_smoothing
        probs[special] = 0.0
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs / probs.sum())
        if cfg.whole_word_mask:
            if word_start is None:
                raise ValueError("masking.whole_word_mask=true needs word_start (use Masker.from_tokenizer)")
            word_start = np.asarray(word_start, dtype=bool)
            if word_start.shape != (self.vocab_size,):
                raise ValueError(f"word_start has shape {word_start.shape}, expected ({self.vocab_size},)")
        self._cpu = {
            "log_probs": torch.from_numpy(log_probs.astype(np.float32)),
            "special": torch.from_numpy(special),
            "rand_pool": torch.from_numpy(np.flatnonzero(~special)).long(),
        }
        if cfg.whole_word_mask:
            self._cpu["word_start"] = torch.from_numpy(word_start)
        self._dev: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_tokenizer(cls, cfg: MaskingConfig, tokenizer, token_counts=None, seed: int = 0) -> Masker:
        """A masker for a Hugging Face tokenizer: its ``len()``, ``all_special_ids``, mask / pad ids and vocabulary
        (for word starts when ``cfg.whole_word_mask``)."""
        vocab_size = len(tokenizer)
        word_start = None
        if cfg.whole_word_mask:
            word_start = word_starts_from_tokens(tokenizer.convert_ids_to_tokens(list(range(vocab_size))))
        return cls(
            cfg,
            vocab_size=vocab_size,
            special_ids=tokenizer.all_special_ids,
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            token_counts=token_counts,
            seed=seed,
            word_start=word_start,
        )

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._dev:
            self._dev[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._dev[device]

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, step: int, rank: int, micro_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one micro-batch.

        Args:
            input_ids: LongTensor [B, L] token ids (special tokens included, pads where ``attention_mask == 0``).
            attention_mask: [B, L], 1 for real positions, 0 for padding.
            step, rank, micro_step: optimizer step, data-parallel rank and micro-step within the step; with the
                masker's seed they determine the result completely (same device type, same inputs).

        Returns:
            ``(masked_ids, labels)``: LongTensor [B, L] each, on the input's device; ``labels`` holds the original id
            at selected positions and -100 elsewhere. Specials and pads are never selected.
        """
        return self._mask(input_ids, attention_mask, step, rank, micro_step)

    def _mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int, rank: int, micro_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # undecorated: mutmut does not mutate decorated functions
        cfg = self.cfg
        device = input_ids.device
        tab = self._tables(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed(self.seed, step, rank, micro_step))
        ids = input_ids.long()
        real = attention_mask.bool() & ~tab["special"][ids]
        n_real = real.sum()
        n_tgt = torch.ceil(n_real.double() * cfg.mlm_mask_prop - 1e-6).long()
        log_p = tab["log_probs"][ids].masked_fill(~real, float("-inf"))
        if cfg.whole_word_mask:
            selected = self._select_words(ids, real, log_p, n_tgt, tab, gen)
        else:
            selected = _top_n(log_p.flatten() + _gumbel(log_p.numel(), device, gen), n_tgt).view_as(ids)
        u = torch.rand(ids.shape, device=device, generator=gen)
        pool = tab["rand_pool"]
        rand_ids = pool[torch.randint(0, pool.numel(), ids.shape, device=device, generator=gen)]
        masked = torch.where(selected & (u < cfg.word_mask), torch.full_like(ids, self.mask_token_id), ids)
        masked = torch.where(selected & (u >= cfg.word_mask + cfg.word_keep), rand_ids, masked)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        return masked.to(input_ids.dtype), labels

    def _select_words(self, ids, real, log_p, n_tgt, tab, gen):
        """Whole words, in Gumbel-key order, until at least ``n_tgt`` tokens are covered. Returns bool [B, L]."""
        prev_real = torch.zeros_like(real)
        prev_real[:, 1:] = real[:, :-1]
        start = (~real | ~prev_real | tab["word_start"][ids]).flatten()
        word = torch.cumsum(start.long(), 0) - 1  # word index of every position, < B*L
        n = word.numel()
        length = torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, word, real.flatten().long())
        word_logp = torch.full((n,), float("-inf"), device=ids.device).scatter_reduce_(
            0, word, log_p.flatten(), reduce="amax"
        )
        keys = word_logp + _gumbel(n, ids.device, gen)
        order = torch.argsort(keys, descending=True)
        before = torch.cumsum(length[order], 0) - length[order]  # tokens taken by words ahead in the order
        take_sorted = (before < n_tgt) & (length[order] > 0)
        take = torch.empty_like(take_sorted).scatter_(0, order, take_sorted)
        return (take[word].view_as(ids)) & real


def _gumbel(n: int, device, gen) -> torch.Tensor:
    """n standard Gumbel samples, float32 (``-log(E)``, E ~ Exp(1))."""
    e = torch.empty(n, device=device).exponential_(generator=gen)
    return -torch.log(e.clamp_min(1e-30))


def _top_n(keys: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``n`` (a device scalar) largest entries of 1-D ``keys``, without a host sync."""
    order = torch.argsort(keys, descending=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(keys.numel(), device=keys.device))
    return rank < n
