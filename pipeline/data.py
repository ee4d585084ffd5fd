"""Real data into image sets (`import`), and the catalog of a workspace (`ls`, `verify`)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from pipeline.config import Config
from pipeline.console import console, human_bytes, shard_list
from pipeline.progress import RateBar
from stores.errors import IntegrityError, UserError
from stores.objectstore import is_url
from stores.remote import as_url


def import_data(cfg: Config, importer: str, sources: list[str], name: str | None, generated: bool = False,
                wait: bool = False) -> None:
    """`dra-pipe import`: sources and name as given (empty / None: the defaults below), then run_import.

    data.source and data.name belong to data.importer: another importer gets neither. Generated files are always
    named, and go to the set the trainer is told to use."""
    from pipeline.schema import SCHEMA
    known = SCHEMA["data"]["importer"].choices
    if importer not in known:
        raise UserError(f"unknown importer {importer!r}; use one of {', '.join(known)}")
    if generated:
        run_import(cfg, importer, sources, name or generated_import_name(cfg), wait, generated=True)
        return
    configured = cfg.data.source if importer == cfg.data.importer else None
    if importer == "imagenet":
        refuse_url_source(sources or ([configured] if configured else []))
        from pipeline.imagenet_import import import_imagenet
        if len(sources) > 1:
            raise UserError(f"import imagenet reads one --from folder, got {len(sources)}; give one --from")
        import_imagenet(cfg, sources[0] if sources else configured, name or (cfg.data.name if configured else None),
                        cfg.data.resolution, wait)
        return
    run_import(cfg, importer, sources or configured, name or (cfg.data.name if configured else None), wait)


def import_configured(cfg: Config) -> None:
    """The run's import stage: data.importer from data.source into sets named data.name (or the importer)."""
    if cfg.data.importer == "imagenet":
        from pipeline.imagenet_import import import_imagenet
        refuse_url_source([cfg.data.source] if cfg.data.source else [])
        import_imagenet(cfg, cfg.data.source, cfg.data.name, cfg.data.resolution)
    else:
        run_import(cfg, cfg.data.importer, cfg.data.source, cfg.data.name)


def local_sources(cfg: Config, source: str | list[str] | None) -> tuple[str | list[str] | None, list[str] | None]:
    """(what to read, what dataset.json records): a source on an object store is brought into this node's cache
    first, with progress, and its URL is recorded (repair brings it again on any node); a local one is as given."""
    texts = [source] if isinstance(source, str) else list(source or [])
    if not any(is_url(t) for t in texts):
        return source, None
    local = [bring_source(cfg, t) for t in texts]
    recorded = [t if is_url(t) else str(Path(t).resolve()) for t in texts]
    return (local[0] if isinstance(source, str) else local), recorded


def bring_source(cfg: Config, text: str) -> str:
    """One source on an object store, in this node's cache (downloaded only when absent or changed)."""
    from stores.sources import source_copy
    copy = source_copy(text, cfg.store.cache_dir)
    total = sum(o.size for o in copy.missing)
    if not total:
        return copy.bring()
    pending = [0]
    with RateBar(f"download {text}", "MB", total=max(1, total // 1_000_000)) as bar:
        def on_bytes(n: int) -> None:
            pending[0] += n
            if pending[0] >= 1_000_000:
                bar.advance(pending[0] // 1_000_000)
                pending[0] %= 1_000_000
        local = copy.bring(on_bytes)
    console.print(f"brought {text} into this node's cache: {human_bytes(total)} in {bar.seconds:.1f} s",
                  highlight=False)
    return local


def refuse_url_source(sources: list[str]) -> None:
    if any(is_url(s) for s in sources):
        raise UserError("import imagenet reads a folder on every node's disk (its workers decode the files where "
                        "they run), not a bucket; copy it to each node (e.g. `aws s3 sync`) and give that folder")


def generated_import_name(cfg: Config) -> str:
    """The set `import npz --generated` writes: the one the trainer is told to use, else the one generate writes."""
    from pipeline.workflow import generated_set
    return cfg.train.generated_set or generated_set(cfg)


def list_sets(root: Path) -> None:
    """`dra-pipe ls`: the catalog; IntegrityError (after it) when a set's records are damaged."""
    damaged = show_catalog(root)
    if damaged:
        raise IntegrityError(f"{len(damaged)} damaged set(s) ({', '.join(damaged[:3])}); `dra-pipe verify` names the "
                             f"problems")


def verify(root: Path, name: str | None, recompute: int = 0) -> int:
    """`dra-pipe verify`: check every shard's checksum of one set (or all), each problem on its own line; returns
    the sets checked, or raises IntegrityError summing up the problems and how to repair them.

    recompute: feature sets found intact also recompute that many samples with their model."""
    from stores.catalog import Problem, resolve_set
    from stores.features import list_feature_sets
    from stores.images import list_image_sets
    targets = [resolve_set(root, name)] if name else \
        [("images", p) for p in list_image_sets(root)] + [("features", p) for p in list_feature_sets(root)]
    problems, checked = [], 0
    for kind, path in targets:
        try:
            found = _verify_one(kind, path)
        except IntegrityError as exc:
            console.print(f"[red]{path.name}: {exc}[/red]")
            problems.append(exc)
            continue
        checked += 1
        problems += found
        if not found and kind == "features" and recompute:
            report_recompute(root, path, recompute)
    if problems:
        damaged = list(dict.fromkeys(p.set_name for p in problems if isinstance(p, Problem)))   # image sets first
        advice = [f"`dra-pipe repair {' '.join(damaged)}` redoes those shards"] if damaged else []
        if len(damaged) < len(problems) and any(not isinstance(p, Problem) for p in problems):
            advice.append("a set whose records are damaged cannot be repaired: delete it and rerun the stage that "
                          "wrote it")
        raise IntegrityError(f"{len(problems)} problem(s) found; {'; '.join(advice)}")
    return checked


def _verify_one(kind: str, path: Path) -> list:
    """One set's damaged shards, each printed (IntegrityError when its records are damaged)."""
    from stores.catalog import verify_feature_set, verify_image_set
    found = verify_image_set(path) if kind == "images" else verify_feature_set(path)
    for p in found:
        console.print(f"[red]{p}[/red]", highlight=False)
    if not found:
        console.print(f"ok: {kind[:-1] if kind == 'images' else 'feature'} set {path.name}", highlight=False)
    return found


def run_import(cfg: Config, importer: str, source: str | list[str] | None, name: str | None, wait: bool = False,
               generated: bool = False) -> None:
    from stages.importers import import_source
    source, recorded = local_sources(cfg, source)
    with RateBar("import", "images") as bar:
        results = import_source(Path(cfg.root), importer, source, name, cfg.data.shard_size, cfg.data.image_format,
                                cfg.data.test_fraction, cfg.data.split_seed, bar.advance, wait, generated, recorded)
    kind = "generated set " if generated else ""
    for r in results:
        if r.skipped:
            console.print(f"already imported: {kind}{r.name} ({r.n} samples, fingerprint {r.fingerprint[:12]}) - "
                          f"nothing to do")
        elif r.damaged:
            console.print(f"repaired {kind}{r.name}: redid damaged shard(s) {shard_list(r.damaged)}"
                          + (f" and {r.shards_written - len(r.damaged)} missing one(s)"
                             if r.shards_written > len(r.damaged) else "")
                          + f", fingerprint {r.fingerprint[:12]}", highlight=False)
        else:
            console.print(f"imported {kind}{r.name}: {r.n} samples in {r.shards_written} shards, fingerprint "
                          f"{r.fingerprint[:12]}")
    if bar.done:
        console.print(f"throughput: {bar.rate:,.0f} images/s ({bar.done} images in {bar.seconds:.2f} s)")
    if importer == "npz" and not generated:
        _dmat_hint(source)


def _dmat_hint(source: str | list[str] | None) -> None:
    """DM-AT's published files are generated data: say how to import them as such (not refused: an npz of real
    images has the same layout)."""
    from stages.npz_source import has_dmat_layout
    files = [source] if isinstance(source, str) else list(source or [])
    if any(has_dmat_layout(Path(f)) for f in files):
        console.print("hint: this .npz has DM-AT's layout ('image' and 'label'); if it holds generated images "
                      "(DM-AT's published data), import it with --generated so the trainer uses it as its generated "
                      "set", highlight=False, soft_wrap=True)


def show_catalog(root: Path) -> list[str]:
    """Print the catalog; returns the names of the sets whose records are damaged."""
    from stores.catalog import catalog
    entries = catalog(root)
    if not entries:
        console.print(f"nothing under {as_url(root)} yet: `dra-pipe import digits` creates the first sets")
        return []
    table = Table("store", "name", "kind", "samples", "shards", "bytes", "identity", "state", title=as_url(root))
    for e in entries:
        state = "complete" if e.complete else \
            (f"error: {e.error}" if e.error else f"partial {e.shards_done}/{e.shards_total}")
        table.add_row(e.kind, e.name, e.what, f"{e.samples:,}/{e.total:,}", f"{e.shards_done}/{e.shards_total}",
                      human_bytes(e.bytes), e.summary, state)
    console.print(table)
    return [e.name for e in entries if e.error]


RECOMPUTE_TOLERANCE = 0.02      # float16 rounding and batching stay far below this
STORAGE_ROUNDING = {"float16": "~1e-3", "float32": "~1e-7"}     # relative rounding of the stored dtype


def report_recompute(root: Path, path: Path, k: int) -> None:
    """Recompute k cached samples of a feature set with the model recorded in its provenance."""
    from stages.extract import recompute_deviation
    from stages.fingerprint import model_fingerprint
    from stages.models import load_model
    from stores.features import FeatureSet
    from stores.images import ImageSet
    fs = FeatureSet(path)
    spec = fs.meta.get("provenance", {}).get("model_spec")
    if not spec:
        raise UserError(f"feature set {fs.key} does not record its model spec; cannot recompute")
    net = load_model(spec)
    if model_fingerprint(net) != fs.identity["model"]:
        raise UserError(f"model {spec} is not the one feature set {fs.key} was computed with (fingerprint differs)")
    images = ImageSet.open(root, fs.identity["image_set_name"])
    if images.fingerprint != fs.identity["image_set"]:
        raise UserError(f"image set {images.name} changed since feature set {fs.key} was computed (fingerprint "
                        f"differs)")
    result = recompute_deviation(net, images, fs, k)
    stored, computed = fs.identity.get("dtype", "float16"), fs.identity.get("compute_dtype", "float32")
    views = result["max_rel_per_view"]
    console.print(f"recomputed {result['samples']} samples of {fs.key} ({len(views)} view(s) each): max abs deviation "
                  f"{result['max_abs']:.3g}, max relative {result['max_rel']:.3g} ({stored} storage rounds at "
                  f"{STORAGE_ROUNDING.get(stored, '?')} relative; computed in {computed}); per view "
                  f"{', '.join(f'v{v} {d:.2g}' for v, d in enumerate(views))}", highlight=False)
    bad = [v for v, d in enumerate(views) if d > RECOMPUTE_TOLERANCE]
    if bad:
        raise IntegrityError(f"feature set {fs.key}: view(s) {', '.join(map(str, bad))} deviate from a recomputation "
                             f"by more than {RECOMPUTE_TOLERANCE:.0%} (relative); rebuild the set (delete {fs.path}, "
                             f"rerun "
                             f"extract-features)")
