"""The ground floor: the contract the two stages share, and nothing else.

Image sets (WebDataset tars, `images`, `tarshard`), feature sets (zarr v3, `features`), manifests and the planned
shard (`manifest`), the paired image + target stream (`stream`), identity and fingerprints (`identity`), the
catalog behind `ls` and `verify` (`catalog`), workspace checks (`workspace`) and the errors every floor raises
(`errors`). Stage 1 (`stages`) writes these stores, stage 2 (`trainer`) reads them; this package imports neither.
"""
