"""The rollout batch on the wire: one Arrow record batch per chunk of images.

Columns (DESIGN.md §3, "Data on the wire"):

    prompt          string
    prompt_index    int64        group key: images of one prompt draw share it
    metadata        string       JSON the scorers need (GenEval's include/exclude, ...)
    image           fixed_shape_tensor<uint8>[H, W, 3]       RGB
    latents         fixed_shape_tensor<float32>[T+1, C, h, w] x_0 (noise) .. x_T
    timesteps       list<float32>  the T timesteps the transformer saw
    log_probs       list<float32>  log p(x_{j+1} | x_j) per step, as sampled
    prompt_embeds   binary       safetensors of the prompt's text embeddings on the first row
                                 of each prompt, null on the others; the call's first row also
                                 carries the negative prompt's. The learner reads them instead
                                 of loading text encoders; scoring and the log drop them.
    forward_batch   int64        the denoising batch of its rollout call the image was
                                 sampled in: the learner recomputes each such batch as
                                 one forward, rows in the same order, so its log-probs
                                 match the rollout's in any precision
    policy_version  int64
    rollout_worker  string
  after scoring:
    rewards         struct<name: float64, ...>  one field per scorer that ran
    reward          float64      weighted total (reward.weights' scorers only)
    details         string       JSON per image: scorer name -> that scorer's details
                                 (GenEval's tag and verdicts, the OCR text read, ...)
  after the controller:
    advantage       float64

Images travel as raw uint8 tensors rather than PNG: encoding 512 px PNGs costs
tens of milliseconds each on the rollout worker and buys nothing inside the
object store. The gRPC reward service, which crosses process and environment
boundaries, uses PNG. Tensor columns convert to numpy without a copy.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

LOG_DROPPED_COLUMNS = ("latents", "image", "prompt_embeds")


def tensor_array(array: np.ndarray) -> pa.Array:
    """A fixed-shape tensor column from an array whose first axis is the row."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def list_array(rows: np.ndarray) -> pa.Array:
    rows = np.asarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1]).cast(
        pa.list_(pa.float32()))


def make_rollout_batch(
    *,
    prompts: Sequence[str],
    prompt_index: Sequence[int],
    metadata: Sequence[Mapping[str, Any]],
    images: np.ndarray,
    latents: np.ndarray,
    timesteps: np.ndarray,
    log_probs: np.ndarray,
    policy_version: int,
    rollout_worker: str,
    forward_batch: np.ndarray | None = None,
    prompt_embeds: Sequence[bytes | None] | None = None,
) -> pa.RecordBatch:
    """`forward_batch` defaults to one denoising batch for all rows; `prompt_embeds`
    (one entry a row, mostly None) is left out when not given."""
    n = len(prompts)
    forward_batch = np.zeros(n, dtype=np.int64) if forward_batch is None else forward_batch
    for name, value in (("prompt_index", prompt_index), ("metadata", metadata), ("images", images),
                        ("latents", latents), ("timesteps", timesteps), ("log_probs", log_probs),
                        ("forward_batch", forward_batch)):
        if len(value) != n:
            raise ValueError(f"make_rollout_batch: {name} has {len(value)} rows, prompts has {n}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"make_rollout_batch: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    columns = {
        "prompt": pa.array(list(prompts), pa.string()),
        "prompt_index": pa.array(np.asarray(prompt_index, dtype=np.int64)),
        "metadata": pa.array([json.dumps(m) for m in metadata], pa.string()),
        "image": tensor_array(images),
        "latents": tensor_array(latents.astype(np.float32, copy=False)),
        "timesteps": list_array(timesteps),
        "log_probs": list_array(log_probs),
        "forward_batch": pa.array(np.asarray(forward_batch, dtype=np.int64)),
        "policy_version": pa.array(np.full(n, policy_version, dtype=np.int64)),
        "rollout_worker": pa.array([rollout_worker] * n, pa.string()),
    }
    if prompt_embeds is not None:
        if len(prompt_embeds) != n:
            raise ValueError(f"make_rollout_batch: prompt_embeds has {len(prompt_embeds)} rows, prompts has {n}")
        columns["prompt_embeds"] = pa.array(list(prompt_embeds), pa.binary())
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


def make_image_batch(prompts: Sequence[str], prompt_index: Sequence[int], metadata: Sequence[Mapping[str, Any]],
                     images: np.ndarray, seeds: Sequence[int], policy_version: int) -> pa.RecordBatch:
    """Images to score that are not rollouts (evaluation samples): the scorers' columns
    of the rollout schema (`prompt_index` the group key), each image's noise `seed` and
    the `policy_version` that drew it."""
    n = len(prompts)
    for name, value in (("prompt_index", prompt_index), ("metadata", metadata), ("images", images), ("seeds", seeds)):
        if len(value) != n:
            raise ValueError(f"make_image_batch: {name} has {len(value)} rows, prompts has {n}")
    return pa.RecordBatch.from_arrays(
        [pa.array(list(prompts), pa.string()), pa.array(np.asarray(prompt_index, dtype=np.int64)),
         pa.array([json.dumps(m) for m in metadata], pa.string()), tensor_array(images),
         pa.array(np.asarray(seeds, dtype=np.int64)), pa.array(np.full(n, policy_version, dtype=np.int64))],
        names=["prompt", "prompt_index", "metadata", "image", "seed", "policy_version"])


def tensor_column(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    """A tensor column as one numpy array [N, ...] (no copy for a single chunk)."""
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column.to_numpy_ndarray()


def list_column(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    """A list<float> column of equal-length rows as a numpy array [N, L]."""
    return np.asarray(batch.column(name).to_pylist(), dtype=np.float32)


def metadata_column(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    return [json.loads(m) for m in batch.column("metadata").to_pylist()]


def with_scores(batch: pa.RecordBatch, rewards: Mapping[str, np.ndarray], total: np.ndarray,
                details: Sequence[Mapping[str, Any]] | None = None) -> pa.RecordBatch:
    """Append `rewards` (a struct of one float per scorer), the weighted `reward` and
    `details`, one {scorer: details} mapping per row (empty ones when not given)."""
    fields = [pa.array(np.asarray(v, dtype=np.float64)) for v in rewards.values()]
    struct = pa.StructArray.from_arrays(fields, names=list(rewards.keys()))
    batch = batch.append_column("rewards", struct)
    batch = batch.append_column("reward", pa.array(np.asarray(total, dtype=np.float64)))
    if details is None:
        details = [{}] * batch.num_rows
    if len(details) != batch.num_rows:
        raise ValueError(f"with_scores: {len(details)} details for {batch.num_rows} rows")
    return batch.append_column("details", pa.array([json.dumps(d, default=_json_scalar) for d in details], pa.string()))


def _json_scalar(value: Any) -> Any:
    """numpy scalars (a scorer's float32 or bool_) as the Python values JSON takes."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def details_column(data: pa.RecordBatch | pa.Table) -> list[dict[str, dict[str, Any]]]:
    """The `details` column as one {scorer: details} dict per row."""
    return [json.loads(d) for d in data.column("details").to_pylist()]


def with_advantages(data: pa.Table, advantages: np.ndarray) -> pa.Table:
    return data.append_column("advantage", pa.array(np.asarray(advantages, dtype=np.float64)))


def concat(batches: Sequence[pa.RecordBatch]) -> pa.Table:
    """Chunks of one iteration as one table. Columns stay chunked: nothing is copied
    here; `tensor_column` joins a column's chunks once, where an array is needed."""
    return pa.Table.from_batches(list(batches))


def rollout_calls(data: pa.Table, rollouts: Sequence[pa.RecordBatch]) -> np.ndarray:
    """For each row of `data`, the index of the rollout batch it came from (group keys,
    `prompt_index`, are unique within an iteration and never span two calls)."""
    call_of = {}
    for call, batch in enumerate(rollouts):
        call_of.update(dict.fromkeys(batch.column("prompt_index").to_pylist(), call))
    return np.array([call_of[key] for key in data.column("prompt_index").to_pylist()], dtype=np.int64)


def rows_in_rollouts(data: pa.Table, rollouts: Sequence[pa.RecordBatch | None], calls: np.ndarray) -> np.ndarray:
    """Each row's position in its rollout batch (`calls[i]` indexes `rollouts`; -1 where
    that batch is None, another learner rank's).

    Scoring returns rows without latents (the largest column, T+1 latents per image), so
    they travel once, from the rollout worker's output straight to the learner, which
    reads them here. Scoring keeps the rows of whole groups in order: a call's rows in
    `data` are its batch's rows of the groups that survived."""
    positions = np.full(data.num_rows, -1, dtype=np.int64)
    keys = data.column("prompt_index").to_numpy()
    for call, batch in enumerate(rollouts):
        if batch is None:
            continue
        mine = np.flatnonzero(calls == call)
        index = batch.column("prompt_index").to_numpy()
        found = np.flatnonzero(np.isin(index, keys[mine]))
        if len(found) != len(mine) or not np.array_equal(index[found], keys[mine]):
            raise ValueError("rows_in_rollouts: the scored rows are not their rollout batch's rows in order; "
                             "pass the rollout batches in the order their chunks were concatenated")
        positions[mine] = found
    return positions


def for_log(data: pa.Table) -> pa.Table:
    """The rollout log's table: the wire schema without latents and images (they go to
    checkpoints and sample grids; a Parquet row per image stays small). The scorers'
    per-image `details` stay: they tell a reader of the log why a reward was what it was."""
    return data.drop_columns([c for c in LOG_DROPPED_COLUMNS if c in data.column_names])
