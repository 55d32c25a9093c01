"""Using a trained model: the inference path, prediction and embeddings, export."""
