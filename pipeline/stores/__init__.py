"""Stores: image sets (WebDataset tars) and feature sets (zarr v3), per the contract in DESIGN.md."""
