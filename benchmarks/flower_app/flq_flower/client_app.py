"""The ClientApp: FLQ-Fed's worker step (docs/algorithm.md step 3) on one node.

Node ``partition-id`` of ``num-partitions`` (``flower-supernode --node-config``)
holds the share FLQ's worker of that id holds (``flq.partition.partition``)
and takes the same minibatch in round k (``flq.partition.BatchStream``). Per
round: load the global model, one minibatch gradient of mean cross-entropy +
(l2/2)||w||^2 (the same code as ``flq worker``: ``FlatModel.gradient``), one
SGD step, and send the new weights back in float32 for FedAvg.

Flower starts a new ClientApp process for every message (subprocess
isolation), so everything here is rebuilt every round: that is part of what
the benchmark measures.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flq.datasets import load_dataset
from flq.model import FlatModel, build_model, l2_loss_and_grad
from flq.partition import BatchStream, partition

from .task import from_flat, tensor_shapes, to_flat

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = context.run_config, context.node_config
    worker_id, num_workers = int(node["partition-id"]), int(node["num-partitions"])
    seed, batch_size, model_name = int(cfg["seed"]), int(cfg["batch-size"]), str(cfg["model"])
    data = load_dataset(str(cfg["dataset"]))
    share = partition(data.train_y, num_workers, str(cfg["partition"]), float(cfg["dir-alpha"]), seed, batch_size)[
        worker_id
    ]
    batches = BatchStream(share, batch_size, seed, worker_id)
    for _ in range(int(msg.content["config"]["server-round"]) - 1):
        batches.next_indices()  # the batches of the rounds before: a new process each round
    idx = batches.next_indices()

    model = FlatModel(build_model(model_name))
    theta = to_flat(msg.content["arrays"].to_numpy_ndarrays())
    model.set_flat(theta)
    g, loss = model.gradient(data.train_x[idx], data.train_y[idx])
    loss += l2_loss_and_grad(theta, g, float(cfg["l2"]))
    theta = theta - np.float32(cfg["lr"]) * g

    content = RecordDict(
        {
            "arrays": ArrayRecord(from_flat(theta, tensor_shapes(model_name))),
            "metrics": MetricRecord({"train_loss": float(loss), "num-examples": int(share.shape[0])}),
        }
    )
    return Message(content=content, reply_to=msg)
