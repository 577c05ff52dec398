"""Fast SMILES tokenizer for MoLFormer (the `tokenizers` library: regex Split + WordLevel + <bos>/<eos>).

Loads the Hub's `tokenizer.json` (or a `vocab.json`) and can build a vocabulary from a SMILES corpus for
offline and from-scratch models. Unlike the reference slow tokenizer, which silently drops characters its
regex cannot match, unmatched characters become `<unk>` and are reported, and so is truncation.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SMILES_REGEX = (
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$|\%[0-9]{2}|[0-9])"
)
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "mask_token": "<mask>"}
UNK_TOKEN = "<unk>"
VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "tokenizer_file": "tokenizer.json"}
_MAX_EXAMPLES = 5


def smiles_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # "isolated": every regex match is a token and every unmatched span stays a piece of its own (-> <unk>)
    return pre_tokenizers.Split(Regex(SMILES_REGEX), behavior="isolated")


def build_vocab(smiles: Iterable[str], min_frequency: int = 1) -> dict[str, int]:
    """Vocabulary from a corpus: specials first (ids 0-3, as in XL), tokens by frequency, `<unk>` last."""
    splitter = smiles_pre_tokenizer()
    counts: Counter[str] = Counter()
    for smi in smiles:
        counts.update(piece for piece, _ in splitter.pre_tokenize_str(smi))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    pattern = Regex(SMILES_REGEX)
    for token, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        # pieces the regex did not match must stay unknown rather than become vocabulary
        if count >= min_frequency and token not in vocab and _is_regex_token(token, pattern):
            vocab[token] = len(vocab)
    vocab[UNK_TOKEN] = len(vocab)
    return vocab


def _is_regex_token(token: str, pattern: Regex) -> bool:
    pieces = pre_tokenizers.Split(pattern, behavior="removed").pre_tokenize_str(token)
    return not pieces  # the whole piece was one regex match


def _backend_from_vocab(vocab: dict[str, int]) -> Tokenizer:
    if UNK_TOKEN not in vocab:
        raise ValueError(f"A MoLFormer vocabulary needs an {UNK_TOKEN} entry.")
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = smiles_pre_tokenizer()
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return backend


class MolformerTokenizer(PreTrainedTokenizerFast):
    """MoLFormer's SMILES tokenizer. Give `tokenizer_file`, `vocab_file`, a `vocab` dict, or use `from_smiles`."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        vocab: dict[str, int] | str | None = None,
        tokenizer_object: Tokenizer | None = None,
        **kwargs,
    ):
        if tokenizer_object is None and (tokenizer_file is None or not os.path.isfile(tokenizer_file)):
            if isinstance(vocab, str):  # transformers 5 passes the vocab file's path under this name
                vocab_file, vocab = vocab, None
            if vocab is None and vocab_file is not None:
                with open(vocab_file, encoding="utf-8") as fh:
                    vocab = json.load(fh)
            if vocab is None:
                raise ValueError("MolformerTokenizer needs tokenizer_file, vocab_file or vocab.")
            tokenizer_object = _backend_from_vocab(vocab)
        for name, token in {**SPECIAL_TOKENS, "unk_token": UNK_TOKEN}.items():
            kwargs.setdefault(name, token)
        kwargs.setdefault("cls_token", SPECIAL_TOKENS["bos_token"])
        kwargs.setdefault("sep_token", SPECIAL_TOKENS["eos_token"])
        kwargs.setdefault("model_max_length", 1_000_000)
        super().__init__(tokenizer_object=tokenizer_object, tokenizer_file=tokenizer_file, **kwargs)

    @classmethod
    def from_smiles(cls, smiles: Iterable[str], min_frequency: int = 1, **kwargs) -> MolformerTokenizer:
        """Build a tokenizer whose vocabulary covers a SMILES corpus (for offline, from-scratch models)."""
        vocab = build_vocab(smiles, min_frequency=min_frequency)
        logger.info("Built a MoLFormer vocabulary of %d tokens.", len(vocab))
        return cls(vocab=vocab, **kwargs)

    def __call__(self, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        if isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str):
            self._report_unknown_and_truncation(texts, kwargs)
        return super().__call__(text, *args, **kwargs)

    def _report_unknown_and_truncation(self, texts: list[str], kwargs: dict) -> None:
        splitter = self.backend_tokenizer.pre_tokenizer
        vocab = self.get_vocab()
        truncating = kwargs.get("truncation") not in (None, False, "do_not_truncate")
        max_length = kwargs.get("max_length") or self.model_max_length
        specials = self.num_special_tokens_to_add() if kwargs.get("add_special_tokens", True) else 0
        unknown: list[tuple[str, list[str]]] = []
        truncated: list[tuple[str, int]] = []
        for smi in texts:
            pieces = [piece for piece, _ in splitter.pre_tokenize_str(smi)]
            missing = [piece for piece in pieces if piece not in vocab]
            if missing:
                unknown.append((smi, missing))
            if truncating and len(pieces) + specials > max_length:
                truncated.append((smi, len(pieces) + specials))
        if unknown:
            logger.warning(
                "%d SMILES hold pieces outside the vocabulary or the SMILES regex; they are encoded as %s, "
                "never dropped. Examples: %s",
                len(unknown),
                UNK_TOKEN,
                "; ".join(f"{smi!r}: {missing}" for smi, missing in unknown[:_MAX_EXAMPLES]),
            )
        if truncated:
            logger.warning(
                "%d SMILES are longer than max_length=%d tokens and were truncated. Examples: %s",
                len(truncated),
                max_length,
                "; ".join(f"{smi[:60]!r} ({n} tokens)" for smi, n in truncated[:_MAX_EXAMPLES]),
            )


MolformerTokenizerFast = MolformerTokenizer


def _register() -> None:
    from transformers import AutoTokenizer

    try:
        from .configuration_molformer import MolformerConfig
    except ImportError:
        from configuration_molformer import MolformerConfig
    AutoTokenizer.register(MolformerConfig, fast_tokenizer_class=MolformerTokenizer, exist_ok=True)


_register()

__all__ = ["MolformerTokenizer", "MolformerTokenizerFast", "SMILES_REGEX", "build_vocab"]
