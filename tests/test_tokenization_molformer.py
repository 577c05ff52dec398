"""MolformerTokenizer: XL ids, Hub-style and vocab.json loading, corpus vocabularies, <unk> and truncation reports."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

import modeling_molformer  # noqa: F401  (registers model_type "molformer" for AutoTokenizer's config lookup)
from tokenization_molformer import MolformerTokenizer, build_vocab

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
ASPIRIN_IDS = [0, 4, 4, 6, 12, 9, 7, 9, 5, 8, 5, 5, 5, 5, 5, 8, 4, 6, 12, 9, 7, 9, 1]
XL_PREFIX = (
    "<bos> <eos> <pad> <mask> C c ( ) 1 O N 2 = n 3 [C@H] [C@@H] F S 4 Cl - o s [nH] # / Br [C@] [C@@] "
    "[N+] [O-] 5 \\ . I 6"
).split()
LOGGER = "tokenization_molformer"


def xl_order_vocab() -> dict[str, int]:
    """The XL vocabulary's known head, filler tokens up to id 2360, and <unk> = 2361."""
    vocab = {token: i for i, token in enumerate(XL_PREFIX)}
    for i in range(len(vocab), 2361):
        vocab[f"[Filler{i}]"] = i
    vocab["<unk>"] = 2361
    return vocab


@pytest.fixture(scope="module")
def xl_tokenizer() -> MolformerTokenizer:
    return MolformerTokenizer(vocab=xl_order_vocab())


def test_aspirin_ids_under_xl_vocabulary(xl_tokenizer):
    assert len(XL_PREFIX) == 37 and len(xl_tokenizer) == 2362
    assert xl_tokenizer(ASPIRIN)["input_ids"] == ASPIRIN_IDS
    special = (xl_tokenizer.bos_token_id, xl_tokenizer.eos_token_id, xl_tokenizer.pad_token_id)
    assert special == (0, 1, 2)
    assert (xl_tokenizer.mask_token_id, xl_tokenizer.unk_token_id) == (3, 2361)
    assert (xl_tokenizer.cls_token_id, xl_tokenizer.sep_token_id) == (0, 1)


def test_regex_splits_multi_character_tokens(xl_tokenizer):
    smiles = "BrC(Cl)[C@@H]1CC%10c1[nH]/C=C\\[N+]"
    pieces = [piece for piece, _ in xl_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(smiles)]
    assert pieces == [
        "Br", "C", "(", "Cl", ")", "[C@@H]", "1", "C", "C", "%10", "c", "1", "[nH]", "/", "C", "=", "C", "\\", "[N+]",
    ]  # fmt: skip


def test_hub_style_folder_loads_with_auto_tokenizer(tmp_path, golden_dir, xl_tokenizer):
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(golden_dir / "ibm-molformer-xl-hub" / name, tmp_path / name)
    xl_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # no trust_remote_code: the native class is used
    assert type(tokenizer) is MolformerTokenizer
    assert tokenizer(ASPIRIN)["input_ids"] == ASPIRIN_IDS
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (2361, 2, 3)
    assert tokenizer.padding_side == "right"


def test_vocab_json_route(tmp_path):
    vocab = build_vocab(["CCO", "c1ccccc1"])
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    direct = MolformerTokenizer(vocab_file=str(tmp_path / "vocab.json"))
    loaded = MolformerTokenizer.from_pretrained(tmp_path)
    # c x6, then 1 and C x2 (ties in string order), then O x1
    assert (vocab["c"], vocab["1"], vocab["C"], vocab["O"], vocab["<unk>"]) == (4, 5, 6, 7, 8)
    expected = [0, 6, 6, 7, 1]
    assert direct("CCO")["input_ids"] == loaded("CCO")["input_ids"] == expected
    with pytest.raises(ValueError, match="<unk>"):
        MolformerTokenizer(vocab={"<bos>": 0, "<eos>": 1, "<pad>": 2, "<mask>": 3, "C": 4})
    with pytest.raises(ValueError, match="needs tokenizer_file"):
        MolformerTokenizer()


def test_from_smiles_vocabulary_order():
    corpus = ["CCO", "CC(=O)O", "c1ccccc1", "[Na+].[Cl-]"]
    tokenizer = MolformerTokenizer.from_smiles(corpus)
    vocab = tokenizer.get_vocab()
    # counts: c 6, C 4, O 4, 1 2, then ( ) . = [Cl-] [Na+] once each; ties in string order
    expected = [
        "<bos>",
        "<eos>",
        "<pad>",
        "<mask>",
        "c",
        "C",
        "O",
        "1",
        "(",
        ")",
        ".",
        "=",
        "[Cl-]",
        "[Na+]",
        "<unk>",
    ]
    assert sorted(vocab, key=vocab.get) == expected
    assert vocab == {token: i for i, token in enumerate(expected)}
    assert tokenizer.unk_token_id == len(expected) - 1


def test_from_smiles_min_frequency_and_unmatched_pieces(caplog):
    vocab = build_vocab(["CCO", "CN", "C%C"], min_frequency=2)
    assert set(vocab) == {"<bos>", "<eos>", "<pad>", "<mask>", "C", "<unk>"}  # N, O once; "%" is no token
    tokenizer = MolformerTokenizer(vocab=vocab)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = tokenizer("CNO")["input_ids"]
    assert ids == [0, vocab["C"], vocab["<unk>"], vocab["<unk>"], 1]
    assert "'CNO'" in caplog.text and "['N', 'O']" in caplog.text


def test_unknown_characters_become_unk_with_warning(caplog, xl_tokenizer):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        encoded = xl_tokenizer(["C%C", "CÄO", "CCO"])["input_ids"]
    # never dropped: one <unk> where the reference slow tokenizer would silently lose a character
    assert encoded[0] == [0, 4, 2361, 4, 1]
    assert encoded[1] == [0, 4, 2361, 9, 1]
    assert encoded[2] == [0, 4, 4, 9, 1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1
    assert "2 SMILES" in warnings[0].getMessage() and "'C%C'" in warnings[0].getMessage()
    assert "CCO'" not in warnings[0].getMessage()


def test_known_bracket_atom_outside_vocabulary_is_reported(caplog, xl_tokenizer):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = xl_tokenizer("C[Fe]C")["input_ids"]
    assert ids == [0, 4, 2361, 4, 1]
    assert "[Fe]" in caplog.text


def test_clean_input_logs_nothing(caplog, xl_tokenizer):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        xl_tokenizer([ASPIRIN, "CCO"], padding=True, truncation=True, max_length=64)
    assert not caplog.records


def test_truncation_is_reported(caplog, xl_tokenizer):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        encoded = xl_tokenizer(["CCCCCCCCCC", "CC"], truncation=True, max_length=5)["input_ids"]
    assert encoded[0] == [0, 4, 4, 4, 1]  # <eos> kept at the end
    assert encoded[1] == [0, 4, 4, 1]
    message = caplog.text
    assert "1 SMILES" in message and "max_length=5" in message and "(12 tokens)" in message


def test_padding_on_the_right_and_input_names(xl_tokenizer):
    encoded = xl_tokenizer(["CCO", "C"], padding=True, return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert encoded["input_ids"].tolist() == [[0, 4, 4, 9, 1], [0, 4, 1, 2, 2]]
    assert encoded["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_save_load_round_trip(tmp_path):
    tokenizer = MolformerTokenizer.from_smiles(["CCO", "c1ccncc1", "CC(=O)[O-].[Na+]"])
    tokenizer.save_pretrained(tmp_path)
    for loaded in (MolformerTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert type(loaded) is MolformerTokenizer
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert loaded.all_special_tokens == tokenizer.all_special_tokens
        batch = ["CC(=O)[O-].[Na+]", "c1ccncc1", "CBr"]
        assert loaded(batch, padding=True)["input_ids"] == tokenizer(batch, padding=True)["input_ids"]
