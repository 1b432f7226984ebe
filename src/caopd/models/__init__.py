"""Models: loading any Hugging Face causal LM, and the packaged tiny default."""
