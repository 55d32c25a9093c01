"""The BiT architecture (ResNet-v2 with weight standardization and GroupNorm), its weight formats, names and downloads."""
