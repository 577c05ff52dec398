"""The project as a package, and model folders that can be published.

`pip install .` must provide `molft` and the four MoLFormer modules, so a model card's usage code runs from
any folder; a saved adapter must name its base without a local absolute path and keep loading; the card
must not show local paths. The wheel is built offline from a copy of the package files, so the build
leaves the repository untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import single_thread, tiny_config  # noqa: F401  (autouse fixture)

import molft
from modeling_molformer_reg import MolformerForRegression
from molft.model_card import USAGE_CODE, regression_model_card
from molft.peft_setup import PeftOptions, apply_peft, load_regression_checkpoint, publish_base_reference
from molft.splits import SplitResult
from tokenization_molformer import MolformerTokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELING_MODULES = (
    "configuration_molformer",
    "modeling_molformer",
    "modeling_molformer_reg",
    "tokenization_molformer",
)
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN(CC)CC", "OC(=O)c1ccccc1", "Clc1ccccc1"]
QUERY = ["CCO", "c1ccccc1O", "CCN(CC)CC"]


def run_python(code: str, cwd: Path, pythonpath: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps --no-build-isolation` (offline) of a copy of the repository's package files."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", *(f"{m}.py" for m in MODELING_MODULES)):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "molft", source / "molft", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, str(source), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (built,) = (tmp / "dist").glob("molft-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (its dependencies are those of this environment)."""
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target)]
    result = subprocess.run([*command, str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return target


def test_wheel_holds_the_package_and_the_modeling_modules(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"{module}.py" for module in MODELING_MODULES} <= names
    assert {"molft/__init__.py", "molft/selection/pool.py", "molft/influence/report.py"} <= names
    assert not any(name.startswith(("run_", "tests/", "configs/")) for name in names)  # scripts stay put
    metadata = zipfile.ZipFile(wheel).read(f"molft-{molft.__version__}.dist-info/METADATA").decode()
    required = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist")
    ]
    required = [r for r in required if "extra ==" not in r]  # optional dependencies are declared apart
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [line for line in listed if line and not line.startswith("#")]
    assert [r.replace(" ", "") for r in required] == [r.replace(" ", "") for r in listed]  # requirements.txt


def test_installed_wheel_imports_from_any_folder(site, tmp_path):
    code = "import molft, modeling_molformer_reg, tokenization_molformer; print(molft.__file__)"
    result = run_python(code, cwd=tmp_path, pythonpath=site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(site / "molft" / "__init__.py")


def _tokenizer() -> MolformerTokenizer:
    return MolformerTokenizer.from_smiles(SMILES)


def _model(tokenizer: MolformerTokenizer, seed: int) -> MolformerForRegression:
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.target_mean, config.target_std = 2.0, 1.5  # predictions in label units differ from raw outputs
    return MolformerForRegression(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny full model, and a LoRA adapter on a local base folder, saved as run_regression.py saves them."""
    tmp = tmp_path_factory.mktemp("models")
    tokenizer = _tokenizer()
    full = tmp / "full"
    _model(tokenizer, 0).save_pretrained(full)
    tokenizer.save_pretrained(full)

    base_dir = tmp / "runs" / "mlm_base"
    _model(tokenizer, 1).save_pretrained(base_dir)
    model = apply_peft(MolformerForRegression.from_pretrained(base_dir), PeftOptions(peft="lora", lora_r=2))
    with torch.no_grad():  # LoRA starts as the base; move it so the adapter matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    adapter = tmp / "runs" / "lora_run"
    model.save_pretrained(adapter)
    model.get_base_model().config.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    recorded = publish_base_reference(model, adapter)
    return {"full": full, "adapter": adapter, "base": base_dir, "recorded": Path(recorded), "tmp": tmp}


def test_adapter_config_names_its_base_relative_to_the_adapter(saved):
    text = (saved["adapter"] / "adapter_config.json").read_text()
    config = json.loads(text)
    assert config["base_model_name_or_path"] == "../mlm_base" == str(saved["recorded"])
    assert config["modules_to_save"] == ["classifier", "score"]  # peft's own names appended once, no repeat
    assert str(saved["tmp"]) not in text  # no local absolute path
    # loading resolves the relative name against the adapter folder, from any working directory
    here = Path.cwd()
    try:
        os.chdir(saved["tmp"].parent)
        model = load_regression_checkpoint(saved["adapter"])
    finally:
        os.chdir(here)
    base = MolformerForRegression.from_pretrained(saved["base"]).eval()
    tokenizer = MolformerTokenizer.from_pretrained(saved["adapter"])
    with torch.no_grad():
        adapted, plain = model.get_base_model().predict(QUERY, tokenizer), base.predict(QUERY, tokenizer)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter is applied, not only its base


def test_base_reference_of_a_hub_id_is_kept():
    model = apply_peft(_model(_tokenizer(), 2), PeftOptions(peft="ia3"))
    model.peft_config["default"].base_model_name_or_path = "ibm/MoLFormer-XL-both-10pct"
    assert publish_base_reference(model, Path("nowhere")) == "ibm/MoLFormer-XL-both-10pct"
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert publish_base_reference(_model(_tokenizer(), 2), Path("nowhere")) is None  # no adapter


def _card(checkpoint: str | None, peft: str, recorded: str | None, tmp: Path) -> str:
    model_args = SimpleNamespace(
        model_name_or_path=checkpoint,
        config_name=str(ROOT / "configs" / "molformer-tiny.json"),
        regression_head="molformer",
        pooling="mean",
        loss="mse",
        target_scaling="standard",
    )
    split = SplitResult([0, 1, 2], [3], [4, 5], method="random")
    return regression_model_card(
        model_args=model_args,
        peft_method=peft,
        data_source=f"files (train={tmp / 'data' / 'my_logd.csv'})",
        split=split,
        metrics={"eval_rmse": 0.5, "test_rmse": 0.6},
        extra_file=str(tmp / "sel" / "selected.csv"),
        n_extra=3,
        label_name="logD",
        base_model=recorded,
    )


def test_card_has_no_local_paths_and_states_the_base(saved):
    tmp = saved["tmp"]
    adapter_card = _card(str(saved["base"]), "lora", "../mlm_base", tmp)
    for card in (adapter_card, _card(None, "none", None, tmp)):
        assert str(tmp) not in card and str(ROOT) not in card
        assert "- Source: files (train=my_logd.csv)" in card
        assert "- External training molecules: 3 from `selected.csv`" in card
        assert "## Metrics (logD)" in card and "| rmse | 0.5000 | 0.6000 |" in card
        assert f"```python\n{USAGE_CODE}\n```" in card
    assert "base_model:" not in adapter_card  # a local base is no Hub id for the metadata
    assert "Fine-tuned from **the local model `mlm_base`**" in adapter_card
    assert (
        "Base model: the local model `mlm_base`, named `../mlm_base` in adapter_config.json" in adapter_card
    )
    hub_card = _card("ibm/MoLFormer-XL-both-10pct", "lora", "ibm/MoLFormer-XL-both-10pct", tmp)
    assert "\nbase_model: ibm/MoLFormer-XL-both-10pct\n" in hub_card
    assert (
        "Base model: [ibm/MoLFormer-XL-both-10pct](https://huggingface.co/ibm/MoLFormer-XL-both-10pct)"
        in hub_card
    )
    scratch = _card(None, "ia3", "./base_model", tmp)
    assert "Fine-tuned from **a new model (molformer-tiny.json)**" in scratch
    assert "adapter_config.json names it `./base_model`, relative to this folder" in scratch


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_card_usage_code_runs_from_another_folder_with_the_installed_wheel(kind, saved, site, tmp_path):
    """The card's code as a user runs it: the wheel on the path (not the repository), another working folder."""
    path = saved[kind]
    card = _card(None, "lora" if kind == "adapter" else "none", "./x", saved["tmp"])
    code = card.split("```python\n")[1].split("```")[0].replace("PATH", repr(str(path)))
    *setup, call = code.strip().splitlines()
    script = "\n".join(
        [
            *setup,
            "import json, molft",
            f"assert molft.__file__.startswith({str(site)!r}), molft.__file__",
            f"print(json.dumps({call.replace(repr(['CCO']), repr(QUERY))}.tolist()))",
        ]
    )
    result = run_python(script, cwd=tmp_path, pythonpath=site)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(result.stdout.strip().splitlines()[-1])
    model = load_regression_checkpoint(path)
    model = model.get_base_model() if kind == "adapter" else model
    with torch.no_grad():
        expected = model.eval().predict(QUERY, MolformerTokenizer.from_pretrained(path))
    assert predicted == pytest.approx(expected.tolist(), abs=1e-5)
