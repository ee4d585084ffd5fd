"""Stage 1: diffusion models, samplers, generate, extract-features, fit-diffusion."""
