"""onegen: one causal LM that both generates and retrieves (OneGen, Zhang et al., EMNLP 2024).

This package holds the contracts shared by every stage (token roles, special tokens, manifests,
typed configs, input errors). The stages themselves live in ``data_prep``, ``pipeline`` and
``evaluation`` and talk to each other only through directories with a ``manifest.json``.
"""

__version__ = "0.1.0"
