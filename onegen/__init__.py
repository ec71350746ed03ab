"""onegen: one causal LM that both generates and retrieves (OneGen, Zhang et al., EMNLP 2024).

This package holds what more than one stage needs, each in a module named after what it holds:
token roles (``roles``), special tokens and the tokenizer fingerprint (``tokens``), manifests
(``manifest``), the prepared-data contract and its Arrow shards (``prepared``, ``shards``), loading a
model export and reading its hidden states (``model_io``, ``hidden``, ``padding``), the text a separate
retriever sees (``retrieval_text``), the RAG method registry (``methods``), MLflow runs, stores and tag
names (``mlflow_run``, ``mlflow_store``, ``mlflow_tags``), typed configs (``config``), devices,
distributed collectives, the offline environment and errors. The stages themselves live in
``data_prep``, ``pipeline`` and ``evaluation``; imports go down only (onegen <- data_prep <- pipeline
<- evaluation), and the stages talk to each other through directories with a ``manifest.json``.
"""

__version__ = "0.1.0"
