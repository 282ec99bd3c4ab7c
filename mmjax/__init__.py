"""mmjax: multimodal (image-text-label) foundation models on JAX/Flax."""
