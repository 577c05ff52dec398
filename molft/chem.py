"""RDKit helpers: the one SMILES check, canonical SMILES, standardisation, scaffolds, fingerprints.

Everything that parses a molecule goes through here so that one RDKit setting (and one place that
silences RDKit's own stderr logging) governs the whole project. RDKit reads text after a space as the
molecule's name and stops at some characters it does not know, so `CCN C` would silently become `CCN`;
`smiles_problem` rejects such text before RDKit sees it, so a molecule is never replaced by a part of it.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

import numpy as np
from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import Descriptors, rdFingerprintGenerator
from rdkit.Chem.MolStandardize import rdMolStandardize
from rdkit.Chem.Scaffolds import MurckoScaffold

# RDKit prints parse errors to stderr; the project reports bad rows itself, with their index.
RDLogger.DisableLog("rdApp.*")

# Every character a SMILES (OpenSMILES plus RDKit's dative bonds `->`/`<-`) can contain. Anything else,
# whitespace included, means the text is not one plain SMILES, whatever RDKit makes of it.
SMILES_ALPHABET = frozenset(string.ascii_letters + string.digits + "()[]=#$:/\\.+-@%*<>")

# The whole text is the molecule: no name after whitespace, no CXSMILES extension.
_PARSER = Chem.SmilesParserParams()
_PARSER.parseName = False
_PARSER.allowCXSMILES = False

# `standardize` values understood by `standardize_mol` and the loaders (None: molecules used as written).
STANDARDIZE_OPTIONS: tuple[str, ...] = ("fragment_neutral", "tautomer")


def smiles_problem(smiles: object) -> str | None:
    """Why `smiles` is not one plain SMILES (before parsing), or None when it may be one.

    Leading/trailing whitespace is allowed (it is stripped); whitespace inside and characters outside
    `SMILES_ALPHABET` (non-ASCII letters, quotes, `~`, ...) are not, because RDKit would read only part
    of such text.
    """
    if not isinstance(smiles, str):
        return "not text"
    text = smiles.strip()
    if not text:
        return "empty"
    if any(ch.isspace() for ch in text):
        return "whitespace inside the SMILES"
    odd = sorted(set(text) - SMILES_ALPHABET)
    if odd:
        return f"characters outside the SMILES alphabet {odd}"
    return None


def parse_smiles(smiles: object) -> tuple[Chem.Mol | None, str | None]:
    """(molecule, None) for a valid SMILES, else (None, the reason it is invalid)."""
    problem = smiles_problem(smiles)
    if problem is not None:
        return None, problem
    mol = Chem.MolFromSmiles(smiles.strip(), _PARSER)  # type: ignore[union-attr]
    if mol is None:
        return None, "RDKit cannot parse it"
    return mol, None


def mol_from_smiles(smiles: object) -> Chem.Mol | None:
    """The molecule `smiles` means, or None when it is not a valid SMILES (see `smiles_problem`)."""
    return parse_smiles(smiles)[0]


def canonical_smiles(smiles: object, isomeric: bool = True) -> str | None:
    """RDKit canonical SMILES, or None when the input is not a valid SMILES."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    return Chem.MolToSmiles(mol, isomericSmiles=isomeric)


def n_components(mol: Chem.Mol) -> int:
    """Number of disconnected parts (a salt or mixture has more than one)."""
    return len(Chem.GetMolFrags(mol))


def check_standardize(standardize: str | None) -> str | None:
    """Validate a `standardize` value; None and "none" mean no standardisation."""
    if standardize is None or (isinstance(standardize, str) and standardize.lower() == "none"):
        return None
    if not isinstance(standardize, str) or standardize not in STANDARDIZE_OPTIONS:
        raise ValueError(
            f"standardize must be one of {list(STANDARDIZE_OPTIONS)} or None; got {standardize!r}."
        )
    return standardize


def standardize_mol(mol: Chem.Mol, standardize: str) -> Chem.Mol:
    """RDKit MolStandardize with RDKit's default settings.

    "fragment_neutral": keep the largest fragment (drops counter-ions and solvents of salts and
    mixtures), then neutralise charges by adding/removing hydrogens; "tautomer": that, then RDKit's
    canonical tautomer, which removes stereo of centres and bonds that tautomerism touches (so distinct
    stereoisomers can become one molecule) and is about 15 times slower.
    """
    standardize = check_standardize(standardize)  # type: ignore[assignment]
    if standardize is None:
        return mol
    largest, uncharger, tautomers = _standardizers()
    mol = uncharger.uncharge(largest.choose(mol))
    if standardize == "tautomer":
        mol = tautomers.Canonicalize(mol)
    return mol


@functools.cache
def _standardizers() -> tuple:
    # built once: constructing them costs more than applying them to a small molecule
    return (
        rdMolStandardize.LargestFragmentChooser(),
        rdMolStandardize.Uncharger(),
        rdMolStandardize.TautomerEnumerator(),
    )


def standardize_smiles(smiles: str, tautomers: bool = False) -> tuple[str, bool]:
    """(canonical SMILES of the standardised molecule, whether it differs from the input's canonical SMILES).

    Raises ValueError for an invalid SMILES.
    """
    mol, problem = parse_smiles(smiles)
    if mol is None:
        raise ValueError(f"Invalid SMILES {smiles!r}: {problem}.")
    before = Chem.MolToSmiles(mol)
    after = Chem.MolToSmiles(standardize_mol(mol, "tautomer" if tautomers else "fragment_neutral"))
    return after, after != before


def murcko_scaffold(smiles: str, include_chirality: bool = False) -> str:
    """Bemis–Murcko scaffold SMILES; acyclic molecules share the empty scaffold ''."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        raise ValueError(f"Cannot parse SMILES {smiles!r}")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)


def molecular_weight(smiles: str) -> float:
    mol = mol_from_smiles(smiles)
    if mol is None:
        raise ValueError(f"Cannot parse SMILES {smiles!r}")
    return float(Descriptors.MolWt(mol))


def morgan_fingerprints(smiles: Sequence[str], radius: int = 2, n_bits: int = 2048) -> list:
    """Morgan (ECFP-like) bit vectors, one per SMILES; raises on an unparsable SMILES."""
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    fps = []
    for i, smi in enumerate(smiles):
        mol = mol_from_smiles(smi)
        if mol is None:
            raise ValueError(f"Cannot parse SMILES at position {i}: {smi!r}")
        fps.append(generator.GetFingerprint(mol))
    return fps


def tanimoto_matrix(query_fps: Sequence, reference_fps: Sequence) -> np.ndarray:
    """Dense [len(query), len(reference)] Tanimoto similarities."""
    out = np.empty((len(query_fps), len(reference_fps)), dtype=np.float32)
    ref = list(reference_fps)
    for i, fp in enumerate(query_fps):
        out[i] = DataStructs.BulkTanimotoSimilarity(fp, ref)
    return out


def nearest_neighbour_similarity(query_fps: Sequence, reference_fps: Sequence) -> np.ndarray:
    """For each query molecule, the Tanimoto similarity of its nearest reference molecule."""
    if len(reference_fps) == 0:
        raise ValueError("Reference set for nearest-neighbour similarity is empty.")
    ref = list(reference_fps)
    return np.array([max(DataStructs.BulkTanimotoSimilarity(fp, ref)) for fp in query_fps], dtype=np.float64)
