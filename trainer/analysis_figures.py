"""The figures of a run's analysis, in runs/<name>/figures/: the normalised singular-value spectrum, the teacher
probe over timestep and layer (with the run and its clean-trained reference), accuracy against the number of
principal components, and the radial power spectrum of input gradients. Matplotlib without pyplot."""
from __future__ import annotations

from pathlib import Path

from trainer.analysis_results import results


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def analysis_figures(body: dict, folder: Path) -> list[Path]:
    """Every figure the analysis has the numbers for; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    name = body.get("run", "")
    out = []
    for entry, draw, file in (("rank", _spectrum, "spectrum.png"), ("dimension", _dimension, "dimension.png"),
                              ("saliency", _saliency, "saliency.png")):
        result = results(body, entry).get(entry)
        if result:
            out.append(draw(result, name, folder / file))
    points = {k: r for k, r in results(body, "teacher-probe/").items() if not k.endswith("/references")}
    if points:
        refs = results(body, "teacher-probe/references").get("teacher-probe/references")
        out.append(_probe(points, refs, name, folder / "teacher_probe.png"))
    return out


def _spectrum(rank: dict, name: str, path: Path) -> Path:
    fig, ax = _figure()
    p = [v for v in rank["spectrum"] if v > 1e-10]
    ax.semilogy(range(1, len(p) + 1), p, marker=".")
    ax.set(xlabel="singular value index", ylabel="sigma_i / sum sigma",
           title=f"{name}: penultimate features, effective rank {rank['erank']:.2f}")
    fig.savefig(path, dpi=110)
    return path


def _dimension(dim: dict, name: str, path: Path) -> Path:
    fig, ax = _figure()
    ks, acc = zip(*dim["curve"])
    ax.semilogx(ks, acc, marker="o", base=2)
    ax.axhline(dim["target"] * dim["full_accuracy"], color="grey", linestyle="--",
               label=f"{dim['target']:.0%} of the full probe ({dim['full_accuracy']:.2%})")
    ax.axvline(dim["dimension"], color="tab:red", linestyle=":", label=f"classification dimension {dim['dimension']}")
    ax.set(xlabel="top principal components k", ylabel="probe test accuracy", ylim=(0, 1.02),
           title=f"{name}: accuracy against k")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _saliency(sal: dict, name: str, path: Path) -> Path:
    fig, ax = _figure()
    ax.semilogy(sal["frequencies"], [max(v, 1e-12) for v in sal["radial"]], marker="o")
    ax.axvline(0.25, color="grey", linestyle="--", label="half the Nyquist frequency")
    ax.set(xlabel="radial frequency (cycles per pixel)", ylabel="mean power per coefficient (normalised)",
           title=f"{name}: input gradients, {sal['low_fraction']:.1%} of the energy at low frequency")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _probe(points: dict, refs: dict | None, name: str, path: Path) -> Path:
    fig, ax = _figure(7.5, 4.5)
    layers: dict[str, list[dict]] = {}
    for r in points.values():
        layers.setdefault(r["layer"] + (f" ({r['feature_set']})" if r.get("feature_set") else ""), []).append(r)
    for label, rows in layers.items():
        rows = sorted(rows, key=lambda r: r["timestep"] if r["timestep"] is not None else -1)
        ts = [r["timestep"] for r in rows]
        line, = ax.plot(ts, [r["robust"] for r in rows], marker="o", label=f"{label} robust")
        ax.plot(ts, [r["clean"] for r in rows], marker=".", linestyle="--", color=line.get_color(),
                label=f"{label} clean")
    for key, colour in (("run", "tab:green"), ("clean", "tab:red")):
        if refs and refs.get(key):
            ax.axhline(refs[key]["robust"], color=colour, linestyle=":",
                       label=f"{refs[key]['name']} robust ({refs[key]['robust']:.1%})")
    ax.set(xlabel="timestep t", ylabel="test accuracy", ylim=(0, 1.02),
           title=f"{name}: linear probe on the teacher, attacked through it")
    ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=110)
    return path


def plot_effective_rank(ranks: dict[str, dict], path: Path) -> Path:
    """Bars of the effective rank per run (coloured by DRA on/off) and the normalised singular values."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), layout="constrained")
    bars, spectrum = fig.subplots(1, 2)
    names = list(ranks)
    colours = ["tab:orange" if ranks[n]["dra"] else "tab:blue" for n in names]
    bars.bar(range(len(names)), [ranks[n]["erank"] for n in names], color=colours)
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right")
    bars.set(ylabel="effective rank exp(H(p))", title="penultimate features, clean test images")
    from matplotlib.patches import Patch
    bars.legend(handles=[Patch(color="tab:orange", label="DRA on"), Patch(color="tab:blue", label="DRA off")])
    for name in names:
        p = [v for v in ranks[name]["spectrum"] if v > 1e-10]          # below: numerically zero
        spectrum.semilogy(range(1, len(p) + 1), p, label=f"{name} ({ranks[name]['erank']:.1f})")
    spectrum.set(xlabel="singular value index", ylabel="sigma_i / sum sigma", title="normalised singular values")
    spectrum.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path
