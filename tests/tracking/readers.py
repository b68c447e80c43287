"""Read what a run sent to each tracker back with that tracker's own reader.

- TensorBoard: ``EventAccumulator``.
- Weights & Biases (offline): the run's ``.wandb`` file is a LevelDB-style log of ``wandb``'s own
  protobuf ``Record`` messages; wandb 0.31 ships no Python reader for it, so the few lines of framing
  are parsed here and every record is decoded by ``wandb.proto.wandb_internal_pb2``.
- MLflow: ``MlflowClient`` on the run's SQLite store.
- trackio: ``trackio.sqlite_storage.SQLiteStorage`` in a subprocess (trackio fixes its folder,
  ``TRACKIO_DIR``, when it is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def tensorboard(folder: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """``({tag: {step: value}}, {text tag: text})`` from a folder of event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    texts = {t: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    return scalars, texts


def wandb_records(path: Path) -> list[Any]:
    """Every record of a ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks ``crc32(4) length(2, little endian) type(1) data``, type 1 a whole
    record, 2/3/4 its first/middle/last piece."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"not a W&B transaction log: {path}"
    pos, block, piece, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            pos += left
            continue
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(piece)
            out.append(rec)
            piece = b""
    return out


def wandb_runs(root: Path) -> list[dict[str, Any]]:
    """Each offline run under ``root/wandb``: name, group, job type, config, history by step, summary."""
    runs = []
    for f in sorted((root / "wandb").glob("offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "file": f}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                run["history"].setdefault(row.get("_step"), {}).update(row)
            elif kind == "summary":
                run["summary"].update(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update}
                )
        run["config"] = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
        runs.append(run)
    return runs


def mlflow_runs(uri: str) -> list[dict[str, Any]]:
    """Every run of the ``alignloop`` experiment: name, tags, params, metric histories, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("alignloop")
    assert exp is not None, f"no 'alignloop' experiment in {uri}"
    out = []
    for r in client.search_runs([exp.experiment_id]):
        rid = r.info.run_id
        history = {k: {m.step: m.value for m in client.get_metric_history(rid, k)} for k in r.data.metrics}
        artifacts = [a.path for a in client.list_artifacts(rid)]
        config = json.loads(Path(client.download_artifacts(rid, "config.json")).read_text())
        out.append(
            {"name": r.info.run_name, "tags": r.data.tags, "params": r.data.params, "history": history,
             "artifacts": artifacts, "config": config, "status": r.info.status, "client": client, "id": rid}
        )  # fmt: skip
    return out


_TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
project = sys.argv[1]
runs = {}
for name in S.get_runs(project):
    runs[name] = {"logs": S.get_logs(project, name), "config": S.get_run_config(project, name)}
print(json.dumps(runs, default=str))
"""


def trackio_runs(folder: Path, project: str = "alignloop") -> dict[str, dict[str, Any]]:
    """``{run name: {"logs": [...], "config": {...}}}`` of a trackio project stored in ``folder``."""
    env = {**os.environ, "TRACKIO_DIR": str(folder)}
    res = subprocess.run(
        [sys.executable, "-c", _TRACKIO_READ, project], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def step_metrics(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as ``{key: {step: value}}`` (numbers only, as the trackers get them)."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                out.setdefault(k, {})[row["step"]] = float(v)
    return out
