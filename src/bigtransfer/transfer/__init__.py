"""Transfer to a new task: the BiT-HyperRule and fine-tuning (the paper's section 3.3)."""
