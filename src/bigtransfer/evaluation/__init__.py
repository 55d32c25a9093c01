"""Evaluation protocols: frozen features, few-shot, VTAB-1k, and what they share."""
