"""A run's analysis.json: one entry per measure (and per teacher-probe point, per teacher for CKA), each with the
key of what it was computed from, so a rerun computes only entries whose key changed; and the headline numbers
`report` and `sweep` show.

    {"format": "dra-pipe-analysis", "run": NAME, "entries": {NAME: {"key": KEY, "result": {...}}, ...}}

Entry names: rank, dimension, sae, align-uniform, saliency, cka/<feature key>, teacher-probe/references and
teacher-probe/t<t>/<layer>[/<feature key>]. The file holds no times or dates: the same inputs give the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from stores.errors import IntegrityError
from stores.identity import write_json_atomic

ANALYSIS_JSON = "analysis.json"
FORMAT = "dra-pipe-analysis"

# headline numbers: key -> (column header, is a fraction shown as a percentage)
SUMMARY = {"erank": ("eff. rank", False), "cka": ("CKA", False), "linear_cosine": ("ridge cos", False),
           "dra_cosine": ("DRA cos", False), "probe_robust": ("probe robust", True),
           "clean_ref_robust": ("clean-ref robust", True), "run_robust": ("run robust", True),
           "class_dim": ("class. dim", False), "sae_nmse": ("SAE nmse", False), "sae_dead": ("SAE dead", True),
           "alignment": ("alignment", False), "uniformity": ("uniformity", False), "low_freq": ("low-freq", True)}


def read_analysis(folder: Path) -> dict:
    """The run folder's analysis.json, or an empty one; a file that is not one is damaged data."""
    path = Path(folder) / ANALYSIS_JSON
    if not path.exists():
        return {"format": FORMAT, "run": Path(folder).name, "entries": {}}
    try:
        body = json.loads(path.read_bytes())
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("entries"), dict):
        raise IntegrityError(f"{path}: not an analysis record (damaged); delete it and run `dra-pipe analyze` again")
    return body


def write_analysis(folder: Path, body: dict) -> Path:
    path = Path(folder) / ANALYSIS_JSON
    write_json_atomic(path, json.loads(json.dumps(body)))
    return path


def results(body: dict, prefix: str) -> dict[str, dict]:
    """{entry name: result} of the entries whose name starts with prefix."""
    return {k: v["result"] for k, v in sorted(body.get("entries", {}).items()) if k.startswith(prefix)}


def summary(body: dict) -> dict:
    """The headline numbers of an analysis (None where the measure was not taken)."""
    one = {k: next(iter(v.values()), None) for k, v in
           ((m, results(body, m)) for m in ("rank", "dimension", "sae", "align-uniform", "saliency", "cka/"))}
    points = [r for k, r in results(body, "teacher-probe/").items() if not k.endswith("/references")]
    refs = results(body, "teacher-probe/references").get("teacher-probe/references") or {}
    best = max(points, key=lambda r: r["robust"], default=None)
    get = lambda entry, key: (one.get(entry) or {}).get(key)          # noqa: E731
    return {"erank": get("rank", "erank"), "cka": get("cka/", "cka"), "linear_cosine": get("cka/", "linear_cosine"),
            "dra_cosine": get("cka/", "dra_cosine"), "probe_robust": best["robust"] if best else None,
            "clean_ref_robust": (refs.get("clean") or {}).get("robust"),
            "run_robust": (refs.get("run") or {}).get("robust"), "class_dim": get("dimension", "dimension"),
            "sae_nmse": get("sae", "nmse"), "sae_dead": get("sae", "dead_fraction"),
            "alignment": get("align-uniform", "alignment"), "uniformity": get("align-uniform", "uniformity"),
            "low_freq": get("saliency", "low_fraction")}


def cell(value, percent: bool) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value:.2%}"
    return str(value) if isinstance(value, int) else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def rank_entry(folder: Path, fingerprint: str, test_set: str, images: int) -> dict | None:
    """The stored effective rank of these weights on these test images, if analysis.json holds it."""
    try:
        rank = results(read_analysis(folder), "rank").get("rank")
    except IntegrityError:
        return None
    if rank and (rank.get("weights_fingerprint"), rank.get("test_set"), rank.get("images")) == (
            fingerprint, test_set, images):
        return rank
    return None


ANALYSIS_COLUMNS = ("run", *(header for header, _ in SUMMARY.values()))


def analysis_rows(runs: list[tuple[str, Path]]) -> list[tuple[str, ...]]:
    """One row of headline numbers per run that has an analysis (none at all when no run has one)."""
    rows = []
    for name, folder in runs:
        try:
            body = read_analysis(folder)
        except IntegrityError:
            continue
        if body["entries"]:
            numbers = summary(body)
            rows.append((name, *(cell(numbers[k], percent) for k, (_, percent) in SUMMARY.items())))
    return rows
