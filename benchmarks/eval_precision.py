"""Test-set evaluation in fp32 against bf16 (and fp16 on CUDA): accuracy and time.

Trains the original experiment (configs/paper_fmnist.json: 20 workers,
bbit 4/8, the 467,818-parameter CNN) for 200 rounds with the simulator,
keeping the global model after rounds 1, 50 and 200 (models already in
``--out`` are reused), then evaluates each on the 10,000 test images in every
precision and prints accuracy, the difference to fp32, and seconds.

    python benchmarks/eval_precision.py [--rounds 1,50,200] [--precisions fp32,bf16]
                                        [--threads 1] [--out benchmarks/results/eval_precision]
                                        [--device auto]

The models are written as ``paper_cnn_round<R>.safetensors`` (what
tests/test_eval_precision.py evaluates, from tests/data/). bf16 is fast only
where the hardware computes it (CPUs with AVX512-BF16 or AMX, CUDA from
Ampere); elsewhere PyTorch emulates it, several times slower than fp32.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", default="1,50,200")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_precision"))
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from flq.config import load_config
    from flq.model import (
        FlatModel,
        build_model,
        flatten,
        layout_of,
        native_bf16,
        save_global_model,
        state_dict_from_flat,
    )
    from flq.runtime import Runtime
    from flq.simulate import simulate

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rounds = [int(r) for r in args.rounds.split(",")]
    models = {r: out / f"paper_cnn_round{r}.safetensors" for r in rounds}
    if not all(p.is_file() for p in models.values()):
        cfg = load_config(
            str(REPO / "configs" / "paper_fmnist.json"),
            {"max_rounds": max(rounds), "eval_every": 0, "threads": args.threads},
        )
        out.mkdir(parents=True, exist_ok=True)

        def keep(done: int, theta, buffers) -> None:
            if done in models:
                state = state_dict_from_flat(layout_of(build_model(cfg.model)), theta, buffers)
                save_global_model(models[done], state, done, cfg.mode)

        t0 = time.perf_counter()
        simulate(cfg, write=False, progress=True, on_model=keep)
        print(f"trained {max(rounds)} rounds in {time.perf_counter() - t0:.0f} s; models in {out}")

    cfg = load_config(str(REPO / "configs" / "paper_fmnist.json"), {"device": args.device, "threads": args.threads})
    rt = Runtime(cfg, evaluates=False)
    x, y = rt.model.prepare_eval_set(rt.data.test_x, rt.data.test_y)
    precisions = args.precisions.split(",")
    print(
        f"{len(y)} test images, batch {cfg.eval_batch_size}, device {rt.device}, {args.threads} thread(s), "
        f"native bf16: {native_bf16(rt.device)}, {os.cpu_count()} cores"
    )
    print(f"{'round':>6} " + " ".join(f"{p + ' acc':>9} {p + ' s':>8}" for p in precisions) + "  max |diff|")
    for r, path in models.items():
        module = build_model("cnn")
        module.load_state_dict(load_file(str(path)))
        model = FlatModel(module, rt.device)
        model.set_flat(flatten(module))
        row, accs = [], []
        for p in precisions:
            model.evaluate(x[:256], y[:256], cfg.eval_batch_size, p)  # warm-up (oneDNN primitives)
            t0 = time.perf_counter()
            acc, _ = model.evaluate(x, y, cfg.eval_batch_size, p)
            row.append(f"{acc:>9.4f} {time.perf_counter() - t0:>8.2f}")
            accs.append(acc)
        print(f"{r:>6} " + " ".join(row) + f"  {max(abs(a - accs[0]) for a in accs):.4f}")


if __name__ == "__main__":
    main()
