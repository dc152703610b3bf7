"""`generate_dataset` on a two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node): the two actors
land on different nodes and both make images."""

from __future__ import annotations

from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from lcmkit.distributed import generate_dataset


def test_work_spreads_across_nodes(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt {i}", "seed": i} for i in range(6)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        summary = generate_dataset(rows, tmp_path / "two", workers=2, threads=1, progress=False)
        nodes = {r["node"] for r in summary.records}
        assert summary.done == 6 and len(nodes) == 2, summary.records
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
