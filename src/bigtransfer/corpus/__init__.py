"""Building a synthetic pre-training corpus (glyphs, icons, emoji) as shards."""
