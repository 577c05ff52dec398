"""molft.model_card: the README.md written into run folders."""

from __future__ import annotations

from types import SimpleNamespace

from molft.files import MLM_DATA_SUMMARY_FILE
from molft.mlm import MlmDataArguments, MlmModelArguments
from molft.model_card import is_hub_id, mlm_model_card, public_text


def _tiny_model() -> SimpleNamespace:
    config = SimpleNamespace(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=40)
    return SimpleNamespace(config=config, num_parameters=lambda: 12345)


def test_mlm_card_records_start_masking_data_and_losses():
    summary = {
        "sources": {"corpus.csv": {"molecules": 200}},
        "n_train": 150,
        "n_validation": 10,
        "duplicates_dropped": 3,
        "heldout_sets": {"split.json (test)": 5},
        "heldout_overlap": {"split.json (test)": 2, "dropped": 2},
    }
    metrics = {"eval_loss": 1.23456, "eval_perplexity": 3.4, "train_runtime": 9.0, "epoch": 2.0}
    card = mlm_model_card(
        MlmModelArguments(config_name="configs/molformer-tiny.json"),
        MlmDataArguments(),
        _tiny_model(),
        summary,
        metrics,
    )
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "from random initialisation (configs/molformer-tiny.json)." in card
    assert "hidden 32,\n  2 layers, 4 heads, 12,345 parameters" in card
    assert "Masking: 15% of tokens, of which 80% `<mask>`" in card
    assert "- `corpus.csv`: 200 molecules" in card
    assert "duplicates (3) and 2 molecules of held-out sets\n(split.json (test))" in card
    assert f"Details: `{MLM_DATA_SUMMARY_FILE}`" in card
    assert "| eval_loss | 1.235 |" in card and "| epoch | 2 |" in card and "train_runtime" not in card
    assert "were read" not in card


def test_mlm_card_of_a_sampled_corpus_says_how_much_was_read():
    summary = {
        "sources": {"corpus.csv": {"rows": 1000}},
        "n_rows": 1000,
        "n_checked": 60,
        "n_train": 50,
        "n_validation": 10,
        "duplicates_dropped": 0,
    }
    card = mlm_model_card(MlmModelArguments(), MlmDataArguments(), _tiny_model(), summary, {})
    assert "- `corpus.csv`: 1000 rows\n\nOnly 60 of these 1000 rows were read" in card
    assert "from ibm/MoLFormer-XL-both-10pct." in card and "(none given)" in card


def test_public_text_keeps_file_names_and_hub_ids_but_no_absolute_paths():
    assert (
        public_text("files (train=/home/me/data/logd.csv, test=~/t.csv)")
        == "files (train=logd.csv, test=t.csv)"
    )
    assert (
        public_text("lipophilicity (chemloader copy at /usr/lib/site/chemloader/Lipophilicity.csv)")
        == "lipophilicity (chemloader copy at Lipophilicity.csv)"
    )
    hub = "Hugging Face Hub scikit-fingerprints/MoleculeNet_Lipophilicity"
    assert public_text(hub) == hub and public_text("data/x.csv") == "data/x.csv"
    assert is_hub_id("ibm/MoLFormer-XL-both-10pct") and not is_hub_id("/abs/model")
    assert not is_hub_id("./base_model") and not is_hub_id("a/b/c") and not is_hub_id(None)


def test_mlm_card_shows_no_absolute_paths():
    summary = {
        "sources": {"/home/me/corpus/zinc.csv": {"molecules": 200}},
        "n_train": 150,
        "n_validation": 10,
        "duplicates_dropped": 0,
    }
    card = mlm_model_card(
        MlmModelArguments(model_name_or_path="/home/me/runs/mlm_start"),
        MlmDataArguments(),
        _tiny_model(),
        summary,
        {},
    )
    assert "/home/me" not in card
    assert "Trained with `run_mlm.py` from mlm_start." in card and "- `zinc.csv`: 200 molecules" in card
