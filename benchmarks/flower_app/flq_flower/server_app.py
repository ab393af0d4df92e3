"""The ServerApp: FedAvg over ``num-nodes`` nodes for ``num-server-rounds``
rounds, from FLQ-Fed's initial model (``flq.model.glorot_init`` with the
run's seed), with central evaluation of the global model on the whole test
set after every round (``evaluate_fn``, the same evaluation code as
``flq master``). No federated evaluation (``fraction_evaluate`` 0).

``evaluate_fn`` is called before round 1 and after each round; it stamps the
wall clock when each evaluation starts and ends, and at the end the list is
written as JSON to the run-config key ``timing-file`` (written to a temporary
name, then renamed: the file appears whole, once the run is done). Round k's
wall time is then end(k) - end(k - 1): training (sending the model, the
nodes' work, the replies, FedAvg) plus the evaluation.
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flq.datasets import load_dataset
from flq.model import FlatModel, build_model, glorot_init

from .task import from_flat, tensor_shapes, to_flat

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    model_name, nodes = str(cfg["model"]), int(cfg["num-nodes"])
    theta0 = glorot_init(build_model(model_name), int(cfg["seed"]))
    data = load_dataset(str(cfg["dataset"]))
    evaluator = FlatModel(build_model(model_name))
    test_x, test_y = evaluator.prepare_eval_set(data.test_x, data.test_y)
    eval_batch_size = int(cfg["eval-batch-size"])
    stamps: list = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.time()
        evaluator.set_flat(to_flat(arrays.to_numpy_ndarrays()))
        acc, entropy = evaluator.evaluate(test_x, test_y, eval_batch_size)
        stamps.append({"round": server_round, "start": start, "end": time.time(), "acc": acc, "entropy": entropy})
        return MetricRecord({"accuracy": acc, "entropy": entropy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(from_flat(theta0, tensor_shapes(model_name))),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout-s"]),
        evaluate_fn=evaluate_fn,
    )
    out = str(cfg["timing-file"])
    if out:
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rounds": stamps, "nodes": nodes}, f)
        os.replace(tmp, out)
