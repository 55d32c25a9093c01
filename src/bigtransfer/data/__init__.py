"""Input: image sources, decoding, datasets, transforms, step-indexed samplers, shards and packed sets."""
