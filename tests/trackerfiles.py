"""Read back what the trackers wrote: TensorBoard event files (TFRecord framing + tensorboardX's Event proto, with
TensorBoard's purge rule) and W&B offline transaction logs (LevelDB-style log records of W&B's Record proto)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def tfrecords(path: Path):
    """The payloads of one TFRecord file: u64 length, u32 crc of it, payload, u32 crc of the payload."""
    data, at = path.read_bytes(), 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        yield data[at + 12:at + 12 + length]
        at += 12 + length + 4


def events(folder: Path, purge: bool = True) -> list:
    """Every Event of the event files directly in `folder`, file by file in the order they were started. With purge,
    TensorBoard's rule: a session start at step P drops what earlier files hold at steps >= P."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    files = []
    for path in folder.glob("events.out.tfevents.*"):
        parsed = [Event.FromString(raw) for raw in tfrecords(path)]
        files.append((parsed[0].wall_time if parsed else 0.0, parsed))
    kept: list = []
    for _, parsed in sorted(files, key=lambda f: f[0]):
        for event in parsed:
            if purge and event.HasField("session_log") and event.session_log.status == SessionLog.START:
                kept = [e for e in kept if e.step < event.step]
            kept.append(event)
    return kept


def scalars(folder: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in the order written."""
    out: dict[str, list] = {}
    for event in events(folder, purge):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def tags(folder: Path) -> set[str]:
    return {v.tag for e in events(folder) for v in e.summary.value}


def hparams(folder: Path) -> dict:
    """The HParams session of tb/hparams: {name: value} of its session start info."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    for event in events(folder):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    return {k: json.loads(type(v).to_json(v)) if hasattr(type(v), "to_json") else _value(v)
                            for k, v in data.session_start_info.hparams.items()}
    return {}


def _value(v):
    kind = v.WhichOneof("kind")
    return getattr(v, kind)


BLOCK = 32768


def wandb_records(path: Path) -> list:
    """W&B's Record protos in a run-<id>.wandb file: a 7-byte header, then 32 KiB blocks of records, each
    crc (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last) + payload."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, at, out, pending = path.read_bytes(), 7, [], b""
    while at + 7 <= len(data):
        left = BLOCK - at % BLOCK
        if left < 7:
            at += left
            continue
        length, kind = struct.unpack_from("<HB", data, at + 4)
        if at + 7 + length > len(data):
            break                                             # still being written
        payload = data[at + 7:at + 7 + length]
        at += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            out.append(Record.FromString(pending))
    return out


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The file's records once its exit record is there: W&B's service process may still be writing them when
    run.finish() has returned."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} over every offline W&B run file of the run."""
    out: dict[str, list] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in finished_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in record.history.item}
            step = record.history.step.num if record.history.HasField("step") else items.get("_step")
            for key, value in items.items():
                if not key.startswith("_") and isinstance(value, (int, float)):
                    out.setdefault(key, []).append((step, value))
    return out
