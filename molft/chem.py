"""RDKit helpers: canonical SMILES, scaffolds, fingerprints and Tanimoto similarity.

Everything that parses a molecule goes through here so that one RDKit setting (and one place that
silences RDKit's own stderr logging) governs the whole project.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import Descriptors, rdFingerprintGenerator
from rdkit.Chem.Scaffolds import MurckoScaffold

# RDKit prints parse errors to stderr; the project reports bad rows itself, with their index.
RDLogger.DisableLog("rdApp.*")


def mol_from_smiles(smiles: object) -> Chem.Mol | None:
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    return Chem.MolFromSmiles(smiles.strip())


def canonical_smiles(smiles: object, isomeric: bool = True) -> str | None:
    """RDKit canonical SMILES, or None when the input does not parse."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    return Chem.MolToSmiles(mol, isomericSmiles=isomeric)


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
