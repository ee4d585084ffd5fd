"""Stage 1, which writes stores: diffusion models (EDM networks and preconditioning, checkpoint loaders), samplers,
generate, extract-features, fit-diffusion, select, and the real-data importers. Imports only `stores`."""
