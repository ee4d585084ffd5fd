"""pipeline.yaml's keys: every key declared once, with its type, default, bounds and one line of help.

pipeline.config validates a file and flag overrides against this; `dra-pipe config --explain` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.sampler_registry import SAMPLERS, sampler_help  # torch-free registries: names and help
from stages.specs import spec_help
from trainer.architectures import ARCHITECTURES, architecture_help
from trainer.settings import OPTIMIZERS, optimizer_help, per_optimizer
from trainer.trackers import LOGGERS

DEFAULT_CONFIG_NAME = "pipeline.yaml"
MAX_COUNT = 10 ** 10           # stores.tarshard.KEY_DIGITS: a sample id has 10 digits
MAX_SEED = 2 ** 32 - 1         # what every generator takes (torch's stops at 2^63 - 1, numpy's legacy one at 2^32 - 1)


@dataclass(frozen=True)
class Key:
    """One configuration key: its type, default, bounds and meaning."""

    kind: type | tuple[type, ...]     # accepted Python type(s) after YAML parsing
    default: Any                      # value when the file omits the key
    help: str                         # one line, shown by `dra-pipe config --explain`
    min: float | None = None          # inclusive lower bound for numbers
    max: float | None = None          # inclusive upper bound for numbers
    choices: tuple | None = None      # allowed values
    nullable: bool = False            # whether null is allowed
    item: type | None = None          # element type for lists
    below_max: bool = False           # max is exclusive
    item_choices: tuple | None = None # allowed values of list elements
    min_items: int = 0                # shortest allowed list


def _k(kind, default, help, **kw) -> Key:
    return Key(kind, default, help, **kw)


RUN_STAGES = ("import", "fit-diffusion", "generate", "extract-features", "train", "eval", "analyze", "report")
ANALYZE_MEASURES = ("teacher-probe", "cka", "rank", "dimension", "sae", "align-uniform", "saliency")

SCHEMA: dict[str, Any] = {
    "root": _k(str, "./dra-data", "workspace root holding images/, features/, models/, runs/: a folder, or "
               "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (credentials from AWS_*/GOOGLE_* as usual)"),
    "store": {
        "cache_dir": _k(str, None, "object-store root only: this node's folder for the local cache of the bucket "
                        "(small files, and shards as they are read); null = $DRA_PIPE_CACHE or ~/.cache/dra-pipe/store",
                        nullable=True),
        "cache_gb": _k(float, None, "object-store root only: most GB of shard data kept in the cache (least recently "
                       "used leaves first); null = no bound", nullable=True, min=0.001),
        "lease_seconds": _k(float, 30.0, "object-store root only: a writer's lease on a set expires this long after "
                            "its holder stops refreshing it (dies)", min=1.0, max=3600.0),
    },
    "data": {
        "importer": _k(str, "digits", "real data set to import",
                       choices=("digits", "cifar10", "cifar100", "npz", "folder", "imagenet", "imagenet64")),
        "source": _k(str, None, "file or folder to import from, or s3://BUCKET/KEY (not needed for digits)",
                     nullable=True),
        "name": _k(str, None, "image-set name prefix; default: the importer's name", nullable=True),
        "shard_size": _k(int, 10000, "samples per image shard (and per feature shard)", min=1, max=10_000_000),
        "image_format": _k(str, "png", "image encoding inside shards: png (lossless) or npy (raw)",
                           choices=("png", "npy")),
        "test_fraction": _k(float, 0.2, "digits only: fraction held out as the test split", min=0.01, max=0.9),
        "split_seed": _k(int, 0, "digits only: seed of the deterministic train/test split", min=0, max=MAX_SEED),
        "resolution": _k(int, 64, "imagenet only: side of the square images (centre crop, then LANCZOS resize); the "
                         "other importers keep their sources' size", min=8, max=4096),
    },
    "model": {
        "spec": _k(str, "fit", f"diffusion model: {spec_help(fit=True)}"),
        "dtype": _k(str, "float32", "compute dtype of the frozen model in generate, extract-features and the online "
                    "teacher: bfloat16/float16 autocast the network calls (CPU and CUDA), the sampler steps stay "
                    "float64; recorded in the set identities (a bf16 set is a sibling, named <data name>-gen-bf16)",
                    choices=("float32", "bfloat16", "float16")),
    },
    "fit_diffusion": {
        "model_channels": _k(int, 32, "base channel count of the SongUNet trained by fit-diffusion", min=4, max=512),
        "channel_mult": _k(list, [1, 2], "channel multiplier per resolution level", item=int, min=1, min_items=1),
        "num_blocks": _k(int, 2, "residual blocks per resolution level", min=1, max=8),
        "batch_size": _k(int, 128, "training batch size", min=1, max=65536),
        "lr": _k(float, 1e-3, "Adam learning rate (ramped up linearly over the first 5% of the run)", min=0.0, max=1.0),
        "ema_halflife_kimg": _k(float, 10.0, "EMA half-life in thousands of images "
                                             "(ramped: at most 5% of the images seen so far)", min=0.0),
        "duration_kimg": _k(float, 120.0, "training length in thousands of images "
                                          "(README: time and sample quality by length)", min=0.001),
        "dropout": _k(float, 0.1, "dropout probability inside the U-Net blocks while training",
                      min=0.0, max=1.0, below_max=True),
        "seed": _k(int, 0, "training seed", min=0, max=MAX_SEED),
    },
    "generate": {
        "n": _k((int, str), 5000, "images to generate (accepts 20M, 1.5k, 1e6)"),
        "name": _k(str, None, "generated image-set name; default: <data name>-gen", nullable=True),
        "seed": _k(int, 0, "run seed: sample i's label and noise depend only on (seed, i)", min=0, max=MAX_SEED),
        "sampler": _k(str, "heun", f"sampler: {sampler_help()}", choices=tuple(SAMPLERS)),
        "steps": _k(int, 18, "sampler steps (Heun: 2*steps-1 network evaluations, the others: steps; "
                    "see generate.sampler)", min=1, max=1000),
        "churn": _k(float, 0.0, "EDM S_churn (0 = deterministic)", min=0.0),
        "batch_size": _k(int, 256, "images per sampler batch", min=1, max=65536),
    },
    "features": {
        "timesteps": _k(list, [100], "DDPM timesteps t in [0, 999]; sigma(t) on the linear schedule", item=int),
        "layer": _k(str, "auto", "diffusion layer to cache; auto = the bottleneck (e.g. dec.8x8_in1)"),
        "pool": _k((str, int), "none", "spatial pooling of targets", choices=("none", "2", "4", "global")),
        "views": _k(int, 1, "augmented views stored per image, each with its exact target (view 0 = the image, with "
                    "flips view 1 = its mirror); made for train.crop_pad and train.flip", min=1, max=1024),
        "views_generated": _k(int, None, "views per image of the generated set; null = features.views", min=1,
                              max=1024, nullable=True),
        "view_seed": _k(int, 0, "seed of each image's view order (views 2.. are distinct random augmentations)",
                        min=0, max=MAX_SEED),
        "noise_seed": _k(int, 0, "seed of the noise eps drawn per (seed, sample id, timestep)", min=0, max=MAX_SEED),
        "dtype": _k(str, "float16", "stored dtype of targets: float16 (half the bytes) or float32 (exact, no overflow "
                    "above 65504); bfloat16 is not offered (numpy and zarr have no bfloat16 dtype)",
                    choices=("float16", "float32")),
        "compression": _k(str, "none", "compression of target chunks (float16 features barely compress)",
                          choices=("none", "zstd", "blosc")),
        "batch_size": _k(int, 256, "images per forward pass", min=1, max=65536),
    },
    "train": {
        "arch": _k(str, "small-cnn", f"classifier architecture: {architecture_help()}", choices=tuple(ARCHITECTURES)),
        "objective": _k(str, "trades", "adversarial objective (clean = no attack, for reference)",
                        choices=("pgd-at", "trades", "clean")),
        "epochs": _k(int, 30, "epochs of ceil(N_real / batch) batches", min=1),
        "batch_size": _k(int, 128, "global batch size (split evenly over the workers)", min=1, max=65536),
        "generated_set": _k(str, None, "generated image set to train on (e.g. one made by `dra-pipe select`); null = "
                            "the workspace's only generated set (e.g. DM-AT's data from `import npz --generated`), "
                            "else generate's set", nullable=True),
        "unsup_fraction": _k(float, 0.5, "fraction of each batch drawn from generated data, in [0, 1)",
                             min=0.0, max=1.0, below_max=True),
        "optimizer": _k(str, "auto", "optimizer: sgd (Nesterov, momentum 0.9; DM-AT) or adamw; auto = per "
                        f"architecture: {optimizer_help()}", choices=("auto", *OPTIMIZERS)),
        "lr": _k(float, None, "peak learning rate (warmup over 2.5% of the steps, then cosine to 0, per step); null = "
                 f"the optimizer's: {per_optimizer('lr')}", min=0.0, nullable=True),
        "weight_decay": _k(float, None, "weight decay (SGD's L2, AdamW's decoupled; skipped on norms, biases and "
                           f"position embeddings); null = the optimizer's: {per_optimizer('weight_decay')}",
                           min=0.0, nullable=True),
        "adam_beta1": _k(float, 0.9, "AdamW beta1 (decay of the gradient's running mean; SGD: unused)",
                         min=0.0, max=1.0, below_max=True),
        "adam_beta2": _k(float, 0.999, "AdamW beta2 (decay of the squared gradient's running mean; SGD: unused)",
                         min=0.0, max=1.0, below_max=True),
        "label_smoothing": _k(float, 0.1, "label smoothing of the cross-entropy", min=0.0, max=1.0),
        "trades_beta": _k(float, 5.0, "TRADES beta", min=0.0),
        "epsilon": _k(float, 0.2, "L-inf radius in [0, 1] pixel units (digits: 17 grey levels, so 8/255 is "
                                  "meaningless; CIFAR: 8/255)", min=0.0, max=1.0),
        "attack_steps": _k(int, 10, "PGD steps during training", min=1),
        "attack_step_size": _k(float, 0.05, "PGD step size in [0, 1] pixel units", min=0.0, max=1.0),
        "precision": _k(str, "float32", "precision of the training step's forward and loss: float32, or bf16 autocast "
                        "(CPU and CUDA)", choices=("float32", "bf16")),
        "attack_precision": _k(str, "float32", "precision of the training attack (TRADES / PGD-AT inner maximisation): "
                               "float32 (DM-AT) or bf16 autocast", choices=("float32", "bf16")),
        "attack_start": _k(str, "normal", "start of the TRADES inner attack: normal (x + 0.001 N(0,1), TRADES) or "
                                          "uniform in the eps-ball (DM-AT)", choices=("normal", "uniform")),
        "crop_pad": _k(int, 0, "random-crop padding in pixels (DM-AT: 4 on 32x32; README: the digits sweep behind 0)",
                       min=0, max=64),
        "flip": _k(bool, False, "random horizontal flips (off for digits: a mirrored digit is another glyph)"),
        "dra_targets": _k(str, "views", "what DRA aligns with: views = stored targets of stored augmentations (exact), "
                          "online = the teacher in the step (exact, costs a tapped forward), shifted = the "
                          "un-augmented target moved by whole cells (an approximation: 60-80% wrong at a U-Net "
                          "bottleneck)",
                          choices=("views", "online", "shifted")),
        "ema_decay": _k(float, 0.995, "EMA decay tau (copies the weights for the first 2.5% of the steps)",
                        min=0.0, max=1.0, below_max=True),
        "dra": _k(bool, True, "add the diffusion representation alignment loss (off or lambda 0 = plain (DM-)AT)"),
        "dra_lambda": _k(float, 0.1, "weight of the DRA loss (REPA: 0.5; README: the digits sweep behind "
                         "0.1)", min=0.0),
        "dra_layer": _k(str, "auto", "classifier feature map aligned with the targets; auto = per architecture"),
        "dra_view": _k(str, "adversarial", "input view whose features are aligned", choices=("adversarial", "clean")),
        "dra_hidden": _k(int, 128, "hidden width of the projection head (REPA: 2048)", min=1, max=65536),
        "dra_depth": _k(int, 3, "linear layers of the projection head (SiLU between)", min=1, max=16),
        "holdout": _k(int, 144, "last real training images held out for per-epoch clean/PGD accuracy (DM-AT: 1024)",
                      min=0),
        "holdout_pgd_steps": _k(int, 20, "PGD steps of the per-epoch held-out evaluation", min=1),
        "checkpoint_every": _k(int, 0, "also checkpoint every this many steps (0 = at epoch ends only)", min=0),
        "loggers": _k(list, ["tensorboard"], "live tracking of every metrics.jsonl row, the figures, the config and "
                      "the final numbers: tensorboard (runs/<name>/tb/), wandb (offline unless WANDB_MODE=online or "
                      "an API key), mlflow (<root>/mlruns unless MLFLOW_TRACKING_URI); wandb and mlflow are optional "
                      "extras (README: Watching runs); [] = none", item=str, item_choices=LOGGERS),
        "seed": _k(int, 0, "training seed", min=0, max=MAX_SEED),
        "workers": _k(int, 1, "data-parallel Ray Train workers (ranks)", min=1),
        "loader_workers": _k(int, 1, "DataLoader worker processes per rank", min=0, max=64),
    },
    "eval": {
        "n": _k(int, 0, "test images evaluated, chosen by eval.subset (0 = all)", min=0),
        "subset": _k(str, "first", "which eval.n images: first = the first n; per-class = n / classes of each class, "
                     "its lowest sample ids (a fixed, class-balanced subset, as RobustBench's 5,000 ImageNet images "
                     "are 5 per class)", choices=("first", "per-class")),
        "pgd_steps": _k(int, 20, "PGD steps (L-inf, random start)", min=1),
        "pgd_step_size": _k(float, None, "PGD step size in [0, 1] pixel units; null = 2.5 eps / steps",
                            min=0.0, max=1.0, nullable=True),
        "pgd_restarts": _k(int, 1, "PGD restarts (each image keeps its worst)", min=1),
        "autoattack": _k(bool, True, "run AutoAttack (needs `pip install pyautoattack`; false skips it)"),
        "autoattack_version": _k(str, "standard",
                                 "AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square) or plus",
                                 choices=("standard", "plus")),
        "batch_size": _k(int, 512, "images per attack batch (AutoAttack's cost is per batch: fewer is faster)",
                         min=1, max=65536),
        "seed": _k(int, 0, "seed of PGD's random starts and of AutoAttack", min=0, max=MAX_SEED),
        "device": _k(str, "auto", "auto (GPU if visible) | cpu | cuda", choices=("auto", "cpu", "cuda")),
        "cpu_threads": _k(int, 1, "torch threads when evaluating on the CPU (0 = torch's default)", min=0, max=1024),
        "weights": _k(str, "best", "a run's weights to evaluate, report and export: best = the epoch with the highest "
                      "held-out PGD accuracy (DM-AT's selection; final when the run holds no images out), final = the "
                      "last EMA weights", choices=("best", "final")),
        "rank_n": _k(int, 0, "report: test images whose penultimate features give the effective rank (0 = all)", min=0),
    },
    "analyze": {
        "measures": _k(list, list(ANALYZE_MEASURES), "measures `dra-pipe analyze` computes (`dra-pipe analyze --help` "
                       "defines each)", item=str, item_choices=ANALYZE_MEASURES, min_items=1),
        "timesteps": _k(list, [25, 100, 200, 400], "teacher probe: DDPM timesteps t in [0, 999] of the teacher's "
                        "features", item=int, min=0, max=999, min_items=1),
        "layers": _k(list, ["auto"], "teacher probe: the teacher's tap layers; auto = the bottleneck, all = every "
                     "tap layer (`dra-pipe model info` lists them)", item=str, min_items=1),
        "probe_pool": _k(str, "none", "teacher probe: its input, the full token grid (none) or the tokens' mean "
                         "(global)", choices=("none", "global")),
        "probe_labels": _k(str, "none", "teacher probe: class label given to a conditional teacher: none (the "
                           "features cannot hold the label) or true (as the cached targets, which then hold it)",
                           choices=("none", "true")),
        "probe_epochs": _k(int, 30, "epochs of every linear probe (teacher probe, classification dimension)", min=1),
        "probe_lr": _k(float, 0.01, "Adam learning rate of every linear probe (cosine-decayed to 0)", min=0.0),
        "n_train": _k(int, 0, "first n training images for probes, PCA, the SAE and the ridge map (0 = all)", min=0),
        "n_test": _k(int, 0, "first n test images every measure is taken on (0 = all)", min=0),
        "batch_size": _k(int, 256, "images per forward pass, rows per probe and SAE step", min=1, max=65536),
        "seed": _k(int, 0, "seed of probes, SAE, attacks' random starts and the augmented pairs", min=0, max=MAX_SEED),
        "sae_expansion": _k(int, 4, "SAE latents per feature dimension", min=1, max=1024),
        "sae_k": _k(int, 8, "SAE active latents per image (TopK)", min=1),
        "sae_epochs": _k(int, 50, "SAE training epochs", min=1),
        "dimension_target": _k(float, 0.95, "classification dimension: fraction of the full probe's accuracy to "
                               "reach", min=0.01, max=1.0),
        "pair_crop_pad": _k(int, 1, "align-uniform: random-crop padding in pixels of the two views of an image "
                            "(plus a flip when train.flip)", min=0, max=64),
        "ridge": _k(float, 1e-3, "cka: ridge penalty of the linear map whose held-out cosine is the baseline "
                    "(relative to the features' mean variance)", min=0.0),
    },
    "run": {
        "stages": _k(list, list(RUN_STAGES), "stages `dra-pipe run` runs, in this order (each skips what is cached)",
                     item=str,
                     item_choices=RUN_STAGES),
        "compare_dra": _k(bool, True, "train (and evaluate) twice, DRA off and on, for the comparison table"),
        "parallel": _k(bool, True, "on the CPU, train (and evaluate) the variants side by side, one process per core "
                       "(lines prefixed with the run's name); false = one after the other"),
        "seeds": _k(list, None, "training seeds: each setting is trained once per seed and the report adds mean +- std "
                    "over them; null = train.seed alone", item=int, nullable=True, min=0, max=MAX_SEED),
        "name": _k(str, None, "prefix of the run names: NAME-<arch>-<dra|nodra>-<seed>; null = "
                   "<arch>-<dra|nodra>-<seed>. A run name holds one setting: give a new prefix to train changed "
                   "settings beside the old runs", nullable=True),
    },
    "ray": {
        "address": _k(str, None, "null = local ray.init(); auto or HOST:PORT joins a cluster", nullable=True),
        "num_cpus": _k(int, 2, "CPUs of the local Ray instance", min=1),
        "cpu_actors": _k(int, 2, "stage-1 actors when there is no GPU (the CPUs are split between them)", min=1),
        "max_retries": _k(int, 3, "attempts per shard before the job stops with the shard's error", min=1),
    },
}
