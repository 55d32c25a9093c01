"""Upstream pre-training (the paper's section 3.1), single process or distributed."""
