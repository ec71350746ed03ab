"""Evaluation: answer EM/F1, retrieval recall by document id, entity-linking strong-match scores."""
