"""Library shared by the run_*.py scripts: data, splits, metrics, PEFT, influence, selection, statistics."""

__version__ = "0.1.0"
