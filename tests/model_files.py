"""Small real model files of every family, for the loaders' tests and the model-family contract.

EDM pickles are written in the NVlabs/edm format: stand-ins for `torch_utils.persistence` and `dnnlib.util`
(written to a temporary folder, importable only while `official_modules` is open) make every layer pickle as
`_reconstruct_persistent_obj(meta)` with meta.state = the module's __dict__, nested layers as nested records
and torch ModuleDicts as plain torch objects, as the official persistence code does. The stand-in
`_reconstruct_persistent_obj` executes `module_src` like the real one, so a plain `pickle.load` of these files
runs the embedded code. Diffusers models are tiny random `UNet2DModel`s in a DDPM pipeline layout.
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

PERSISTENCE_SRC = '''
import types, uuid

def _reconstruct_persistent_obj(meta):
    """Like the official loader: run the pickled module source and instantiate the class."""
    module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
    exec(meta["module_src"], module.__dict__)
    cls = module.__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    obj.__dict__.update(meta["state"])
    return obj


class Record:
    """Pickles as an official persistent object."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))
'''

EASYDICT_SRC = '''
class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)
'''

_OFFICIAL = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


@contextlib.contextmanager
def official_modules(folder: Path):
    """(torch_utils.persistence, dnnlib.util.EasyDict): the stand-ins, importable while the context is open."""
    lib = Path(folder) / "official_lib"
    for package, module, src in [("torch_utils", "persistence", PERSISTENCE_SRC), ("dnnlib", "util", EASYDICT_SRC)]:
        (lib / package).mkdir(parents=True, exist_ok=True)
        (lib / package / "__init__.py").write_text("")
        (lib / package / f"{module}.py").write_text(src)
    saved = {name: sys.modules.pop(name) for name in _OFFICIAL if name in sys.modules}
    sys.path.insert(0, str(lib))
    importlib.invalidate_caches()
    try:
        import dnnlib.util
        import torch_utils.persistence
        yield torch_utils.persistence, dnnlib.util.EasyDict
    finally:
        sys.path.remove(str(lib))
        for name in _OFFICIAL:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def to_records(module: nn.Module, official, module_src: str, init_kwargs: dict | None = None):
    """Our module tree in the official pickled form (persistent records around __dict__ copies)."""
    persistence, EasyDict = official
    state = dict(module.__dict__)
    state["_parameters"], state["_buffers"] = dict(module._parameters), dict(module._buffers)
    state["_modules"] = {name: None if child is None else to_records(child, official, module_src)
                         for name, child in module._modules.items()}
    if type(module) is nn.ModuleDict:  # not a persistent class: pickled as a plain torch object
        container = nn.ModuleDict.__new__(nn.ModuleDict)
        container.__dict__.update(state)
        return container
    state["_init_args"] = ()
    state["_init_kwargs"] = EasyDict(init_kwargs or {})
    return persistence.Record(dict(type="class", version=6, module_src=module_src,
                                   class_name=type(module).__name__, state=state))


def class_source(model: nn.Module, prefix: str = "") -> str:
    """Module source defining every class name used in the pickle (so a plain pickle.load works)."""
    names = sorted({type(m).__name__ for m in model.modules()} | {"EDMLoss"})
    return prefix + "".join(f"class {n}:\n    pass\n" for n in names)


def write_pickle(path, ema, official, module_src="", protocol=pickle.DEFAULT_PROTOCOL):
    persistence, EasyDict = official
    loss = persistence.Record(dict(type="class", version=6, module_src=module_src, class_name="EDMLoss",
                                   state=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)))
    data = dict(ema=ema, loss_fn=loss, augment_pipe=None,
                dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def write_edm_pickle(path: Path, net: nn.Module) -> Path:
    """`net` (an EDMPrecond) as an official EDM training snapshot at `path`."""
    with official_modules(Path(path).parent) as official:
        src = class_source(net)
        return write_pickle(path, to_records(net, official, src, net.config), official, src)


def tiny_unet(num_class_embeds=None, seed=0):
    """A random 8x8 RGB DDPM UNet2DModel with two resolution levels (16 and 32 channels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds).eval()


def save_ddpm_pipeline(root: Path, unet, **scheduler_kwargs) -> Path:
    """A DDPM pipeline layout: root/unet, root/scheduler."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(root / "unet")
    DDPMScheduler(**scheduler_kwargs).save_pretrained(root / "scheduler")
    return root
