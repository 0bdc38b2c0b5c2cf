"""What a whole test run left in its run folder."""
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq


def logged_once(run_dir, iterations):
    """Every (iteration, group) of the run in the rollout log exactly once (4 images a
    group, 2 groups an iteration), and every iteration once in metrics.jsonl."""
    log = pq.read_table(Path(run_dir) / "rollouts")
    groups = Counter(zip(log.column("iteration").to_pylist(), log.column("group").to_pylist()))
    rows = [json.loads(line)["iteration"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return (groups == {(it, g): 4 for it in range(iterations) for g in (2 * it, 2 * it + 1)}
            and rows == list(range(iterations)))
