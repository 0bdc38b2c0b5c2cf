"""The Arrow rollout batch: round trip, and latents joined back to the scored rows."""
import numpy as np
import pytest

from common import wire


def _batch(groups, rows_per_group=2, seed=0):
    n = len(groups) * rows_per_group
    rng = np.random.default_rng(seed)
    return wire.make_rollout_batch(
        prompts=[f"p{g}" for g in groups for _ in range(rows_per_group)],
        prompt_index=[g for g in groups for _ in range(rows_per_group)],
        metadata=[{"g": g} for g in groups for _ in range(rows_per_group)],
        images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        latents=rng.standard_normal((n, 3, 4, 2, 2)).astype(np.float32),
        timesteps=np.tile([1000.0, 500.0], (n, 1)), log_probs=rng.standard_normal((n, 2)),
        policy_version=3, rollout_worker="rollout-0")


def test_batch_round_trips():
    batch = _batch([5, 9])
    assert wire.tensor_column(batch, "latents").dtype == np.float32
    assert wire.tensor_column(batch, "image").shape == (4, 8, 8, 3)
    assert wire.list_column(batch, "timesteps").tolist() == [[1000.0, 500.0]] * 4
    assert wire.metadata_column(batch)[2] == {"g": 9}
    scored = wire.with_scores(batch, {"brightness": np.arange(4.0)}, np.arange(4.0))
    table = wire.with_advantages(wire.concat([scored, scored]), np.zeros(8))
    assert table.num_rows == 8 and table.column("reward").to_pylist()[:4] == [0.0, 1.0, 2.0, 3.0]
    assert "latents" not in wire.for_log(table).column_names


def test_latents_join_back_to_the_groups_that_survived_scoring():
    first, second = _batch([0, 1], seed=1), _batch([2, 3], seed=2)
    # group 1 failed scoring: the scored table holds groups 0, 2, 3, without latents
    scored = wire.concat([first.filter(np.isin(first.column("prompt_index").to_numpy(), [0])), second])
    scored = scored.drop_columns(["latents"])
    calls = wire.rollout_calls(scored, [first, second])
    positions = wire.rows_in_rollouts(scored, [first, second], calls)
    joined = np.concatenate([wire.tensor_column([first, second][c], "latents")[[p]] for c, p in zip(calls, positions)])
    expected = np.concatenate([wire.tensor_column(first, "latents")[:2], wire.tensor_column(second, "latents")])
    assert np.array_equal(joined, expected)
    assert wire.rows_in_rollouts(scored, [None, second], calls)[:2].tolist() == [-1, -1]  # another rank's call
    with pytest.raises(ValueError, match="in order"):
        wire.rows_in_rollouts(scored, [second, first], calls)


def test_details_travel_as_json_per_row_and_stay_in_the_log():
    batch = _batch([5, 9])
    details = [{"geneval": {"tag": "position", "correct": np.bool_(i % 2 == 0), "score": np.float32(0.75)},
                "ocr": {"text": f"t{i}", "target": "t"}} for i in range(4)]
    scored = wire.with_scores(batch, {"brightness": np.arange(4.0)}, np.arange(4.0), details)
    log = wire.for_log(wire.concat([scored]))
    assert log.schema.field("details").type == "string"
    back = wire.details_column(log)
    assert back[1] == {"geneval": {"tag": "position", "correct": False, "score": 0.75}, "ocr": {"text": "t1", "target": "t"}}
    assert wire.details_column(wire.with_scores(batch, {"brightness": np.arange(4.0)}, np.arange(4.0))) == [{}] * 4
    with pytest.raises(ValueError, match="3 details for 4 rows"):
        wire.with_scores(batch, {"brightness": np.arange(4.0)}, np.arange(4.0), details[:3])
