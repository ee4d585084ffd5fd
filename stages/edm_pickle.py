"""Safe loader for official NVlabs/edm network pickles (`edm-cifar10-32x32-cond-vp.pkl`, ...).

An official pickle is `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`
where every network object is stored as `torch_utils.persistence._reconstruct_persistent_obj(meta)`,
meta = dict(type='class', version=6, module_src=<Python source>, class_name=..., state=<__dict__>).
`pickle.load` would execute `module_src`. Here a restricted unpickler resolves only a short list of
globals, turns each persistent object into an inert `PersistentRecord` (the source is kept as text
and never run), builds our own `EDMPrecond` from the recorded constructor keywords and copies the
tensors by name.
"""
from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.edm.networks import EDMPrecond
from stores.errors import UserError

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of every official EDM pickle


class PersistentRecord:
    """Inert stand-in for an object pickled by `torch_utils.persistence`: its class name and state dict."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src  # text only; never executed

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class ContainerRecord:
    """Inert stand-in for a torch container module (ModuleDict, ...): filled by pickle's BUILD."""

    class_name = "Module"

    def __init__(self):
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.class_name} state is {type(state).__name__}, expected a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"ContainerRecord({self.class_name})"


def _container(name: str) -> type[ContainerRecord]:
    return type(f"{name}Record", (ContainerRecord,), {"class_name": name})


def _persistent_record(meta) -> PersistentRecord:
    """Replacement for `_reconstruct_persistent_obj`: validate meta and record it, run nothing."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f"persistent object meta is {type(meta).__name__}, expected a dict")
    if meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(
            f"persistent object of type {meta.get('type')!r} version {meta.get('version')!r}: "
            f"only type 'class' version {PERSISTENCE_VERSION} (torch_utils.persistence of NVlabs/edm) is supported")
    class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src")
    if not isinstance(class_name, str) or not isinstance(state, dict) or not isinstance(src, str):
        raise pickle.UnpicklingError("persistent object meta lacks class_name, state or module_src")
    return PersistentRecord(class_name, state, src)


def _storage_from_bytes(data) -> torch.TypedStorage:
    """Replacement for `torch.storage._load_from_bytes`, which would run torch.load(weights_only=False)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("tensor storage is not a bytes object")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Detected pickle protocol.*")
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError(f"tensor storage decoded to {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> torch.Tensor:
    """Replacement for `torch._utils._rebuild_tensor[_v2]`: a view of a decoded storage, hooks dropped."""
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError(f"tensor built on a {type(storage).__name__}, expected a storage")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch._utils._rebuild_tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _parameter_data(data, *unused) -> torch.Tensor:
    """Replacement for `torch._utils._rebuild_parameter[_with_state]`: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data


def _numpy_scalar(dtype, data=None):
    """Replacement for numpy's `multiarray.scalar` that refuses object dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("only plain numeric numpy scalars are allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding="latin1") -> bytes:
    """Replacement for `_codecs.encode`, which protocol-2 pickles use for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 encoded bytes are allowed")
    return text.encode("latin1")


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 2 module names
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter_data,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter_data,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    **{("torch.nn.modules.container", name): _container(name) for name in ("ModuleDict", "ModuleList", "Sequential")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `SAFE_GLOBALS`; anything else is an UnpicklingError naming it."""

    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an EDM pickle") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids do not occur in EDM pickles")


def read_edm_pickle(path: str | Path) -> dict:
    """The top-level dict of an official EDM pickle, networks as inert `PersistentRecord`s."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the path of an EDM network pickle (.pkl)")
    try:
        with path.open("rb") as f:
            data = RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
        raise UserError(f"{path} is not a usable EDM network pickle ({type(exc).__name__}: {str(exc)[:300]}); "
                        f"pass an official NVlabs/edm .pkl such as edm-cifar10-32x32-cond-vp.pkl") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), PersistentRecord):
        raise UserError(f"{path} holds no 'ema' network: expected an NVlabs/edm training snapshot "
                        f"(a dict with ema, loss_fn, augment_pipe, dataset_kwargs)")
    return data


def _named_tensors(record, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect the persistent parameters and buffers of a record tree under state-dict names."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for slot in ("_parameters", "_buffers"):
        for name, value in dict(state.get(slot) or {}).items():
            if value is None or (slot == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise UserError(f"EDM pickle: {prefix}{name} is a {type(value).__name__}, expected a tensor")
            out[prefix + name] = value
    for name, child in dict(state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ContainerRecord)):
            raise UserError(f"EDM pickle: module {prefix}{name} is a {type(child).__name__}, expected a network layer")
        _named_tensors(child, f"{prefix}{name}.", out)


def _check_classes(record, module: nn.Module, path: str) -> None:
    """Every recorded submodule must have the class name of our module at the same place."""
    ours = type(module).__name__
    if record.class_name != ours:
        raise UserError(f"EDM pickle: {path or 'ema'} is a {record.class_name}, this loader builds {ours} there; "
                        f"only the official EDMPrecond/SongUNet/DhariwalUNet layer classes are supported")
    children = dict(record.state.get("_modules") or {})
    for name, child in children.items():
        mine = module._modules.get(name)
        if child is not None and mine is not None:
            _check_classes(child, mine, f"{path}.{name}" if path else name)


def _build(ema: PersistentRecord) -> EDMPrecond:
    """Our EDMPrecond (on the meta device, no memory) from the recorded constructor arguments."""
    if ema.class_name != "EDMPrecond":
        raise UserError(f"EDM pickle: ema is a {ema.class_name}; only EDMPrecond networks are supported "
                        f"(VPPrecond, VEPrecond and iDDPMPrecond are not)")
    args, kwargs = ema.state.get("_init_args"), ema.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, (tuple, list)):
        raise UserError("EDM pickle: ema lacks its constructor arguments (_init_args/_init_kwargs)")
    try:
        with torch.device("meta"):
            return EDMPrecond(*args, **kwargs)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
        raise UserError(f"EDM pickle: ema constructor arguments do not fit EDMPrecond: {exc}") from None


def _matched_state(net: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors from the pickle checked against our state dict by name and shape, in our dtype."""
    expected = net.state_dict()
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing or extra:
        raise UserError(f"EDM pickle does not match the network built from its config: "
                        f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    out = {}
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UserError(f"EDM pickle: {name} has shape {tuple(t.shape)}, the network expects {tuple(ref.shape)}")
        out[name] = t.detach().to(dtype=ref.dtype).clone()
    return out


def load_edm_pickle(path: str | Path) -> EDMPrecond:
    """The `ema` network of an official EDM pickle as our `EDMPrecond`, in eval mode without gradients.

    Nothing from the pickle is executed: unknown globals, unknown classes and missing, extra or
    mis-shaped tensors raise UserError.
    """
    ema = read_edm_pickle(path)["ema"]
    net = _build(ema)
    _check_classes(ema, net, "")
    tensors: dict[str, torch.Tensor] = {}
    _named_tensors(ema, "", tensors)
    net.load_state_dict(_matched_state(net, tensors), strict=True, assign=True)
    return net.eval().requires_grad_(False)
