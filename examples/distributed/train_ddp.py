"""Data-parallel training of a model containing a diffopt layer with DistributedDataParallel.

A linear model maps features to a predicted cost vector ĉ; a QP layer turns it into a decision
w*(ĉ) = argmin_{w ∈ simplex} ĉᵀw + γ‖w‖² (a smoothed "pick the cheapest option"), and the
decision-focused loss is the true cost of that decision, cᵀw*(ĉ), averaged over the batch. The
gradient flows through the QP's KKT conditions.

Each process (rank) takes its own shard of every global batch (``DistributedSampler``), solves its
shard's QPs, and DDP averages the gradients across ranks before each optimizer step. With equal
shard sizes and a mean-reduced loss that average *is* the full-batch gradient, so ``--single``
(one process, each step on the concatenation of the shards) reaches the same parameters; in float64
they agree to rounding (1e-13 to 1e-11). ``tests/test_distributed.py`` checks this.

Launch (2 processes on this machine, gloo on CPU)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --out ddp.pt
    OMP_NUM_THREADS=1 python examples/distributed/train_ddp.py --single --world-size 2 \
        --out single.pt

On GPUs add ``--device cuda`` (one GPU per rank, NCCL backend). See README.md in this folder for
several machines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import cvxpy as cp
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from diffopt import CvxpyLayer, QPLayer


def make_data(n_samples: int, n_options: int, n_features: int, seed: int):
    """Deterministic data from ``seed``: true costs depend nonlinearly on the features."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_features, n_options, generator=g, dtype=torch.float64)
    X = torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    C = (X @ W / n_features**0.5 + 1.0) ** 3 / 4
    C = C + 0.3 * torch.randn(n_samples, n_options, generator=g, dtype=torch.float64)
    return X, C


class DecisionModel(nn.Module):
    """Features -> predicted costs (linear) -> decision (QP layer, no parameters of its own)."""

    def __init__(self, n_features: int, n_options: int, gamma: float, layer: str) -> None:
        super().__init__()
        self.predict = nn.Linear(n_features, n_options, dtype=torch.float64)
        self.gamma = gamma
        self.kind = layer
        n = n_options
        if layer == "cvxpy":
            w = cp.Variable(n)
            c = cp.Parameter(n)
            prob = cp.Problem(cp.Minimize(c @ w + gamma * cp.sum_squares(w)),
                              [w >= 0, cp.sum(w) == 1])
            self.layer = CvxpyLayer(prob, parameters=[c], variables=[w])
        elif layer == "qp":
            # The same QP in tensor form: ½wᵀ(2γI)w + ĉᵀw  s.t.  -w <= 0,  1ᵀw = 1.
            self.layer = QPLayer()
            eye = torch.eye(n, dtype=torch.float64)
            self.register_buffer("P", 2 * gamma * eye)
            self.register_buffer("G", -eye)
            self.register_buffer("h", torch.zeros(n, dtype=torch.float64))
            self.register_buffer("A", torch.ones(1, n, dtype=torch.float64))
            self.register_buffer("b", torch.ones(1, dtype=torch.float64))
        else:
            raise ValueError(f"unknown layer {layer!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_hat = self.predict(x)
        if self.kind == "cvxpy":
            (w,) = self.layer(c_hat)
            return w
        return self.layer(self.P, c_hat, self.G, self.h, self.A, self.b)


def shard_loaders(dataset, world_size: int, batch_per_rank: int, seed: int):
    """One DataLoader per rank, exactly as each DDP rank builds its own (equal shards)."""
    samplers = [DistributedSampler(dataset, num_replicas=world_size, rank=r, shuffle=True,
                                   seed=seed, drop_last=True) for r in range(world_size)]
    loaders = [DataLoader(dataset, batch_size=batch_per_rank, sampler=s, drop_last=True)
               for s in samplers]
    return samplers, loaders


def batches(samplers, loaders, steps: int):
    """Yield ``steps`` tuples of per-rank batches, walking through epochs as needed."""
    epoch, done = 0, 0
    while done < steps:
        for s in samplers:
            s.set_epoch(epoch)
        for per_rank in zip(*loaders):
            yield per_rank
            done += 1
            if done == steps:
                return
        epoch += 1
        if len(loaders[0]) == 0:
            raise ValueError("dataset too small for one batch per rank")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="where rank 0 saves the final parameters (.pt)")
    ap.add_argument("--single", action="store_true",
                    help="one process, full batch = the --world-size shards concatenated")
    ap.add_argument("--world-size", type=int, default=2,
                    help="number of shards to emulate with --single (torchrun sets it otherwise)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps")
    ap.add_argument("--batch-per-rank", type=int, default=8, help="samples per rank and step")
    ap.add_argument("--samples", type=int, default=64, help="training set size")
    ap.add_argument("--options", type=int, default=6, help="size of the decision (QP variable)")
    ap.add_argument("--features", type=int, default=4, help="features per sample")
    ap.add_argument("--gamma", type=float, default=0.5, help="quadratic smoothing of the decision")
    ap.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    ap.add_argument("--seed", type=int, default=0, help="data, initialization and shuffling")
    ap.add_argument("--layer", choices=["cvxpy", "qp"], default="cvxpy",
                    help="CvxpyLayer or the same problem through QPLayer")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: one GPU per rank (LOCAL_RANK), NCCL backend by default")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                    help="auto: nccl with --device cuda, gloo otherwise")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a collective may wait for the other ranks")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed = not args.single
    if distributed:
        if "RANK" not in os.environ:
            raise SystemExit("no RANK in the environment: launch with torchrun, or pass --single")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world_size, local_rank = 0, args.world_size, 0

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = args.backend if args.backend != "auto" else (
        "nccl" if device.type == "cuda" else "gloo")

    if distributed:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))

    X, C = make_data(args.samples, args.options, args.features, args.seed)
    dataset = TensorDataset(X, C)
    samplers, loaders = shard_loaders(dataset, world_size, args.batch_per_rank, args.seed)

    torch.manual_seed(args.seed)  # same initialization everywhere (DDP also broadcasts rank 0's)
    model = DecisionModel(args.features, args.options, args.gamma, args.layer).to(device)
    initial = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
    net = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)

    losses = []
    for step, per_rank in enumerate(batches(samplers, loaders, args.steps)):
        if distributed:
            xb, cb = per_rank[rank]           # this rank's shard only
        else:                                  # the full batch: all shards, concatenated
            xb = torch.cat([x for x, _ in per_rank])
            cb = torch.cat([c for _, c in per_rank])
        xb, cb = xb.to(device), cb.to(device)
        w = net(xb)
        loss = (cb * w).sum(1).mean()         # decision-focused: true cost of the decision
        opt.zero_grad()
        loss.backward()                        # DDP: gradients averaged over the ranks here
        opt.step()
        report = loss.detach().clone()
        if distributed:                        # global mean loss, for logging
            dist.all_reduce(report)
            report /= world_size
        losses.append(float(report))
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.10f}", flush=True)

    result = {
        "params": {k: v.detach().cpu() for k, v in model.named_parameters()},
        "initial": initial,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "world_size": world_size,
        "mode": "single" if args.single else f"ddp-{backend}",
    }
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(result, args.out)
        print(f"saved parameters to {args.out} ({result['mode']}, {world_size} shards)")
    if distributed:
        dist.barrier()
        # Give gloo's worker thread time to drop its last work objects (it needs the GIL to
        # release their tensors: time.sleep lets it have it) before anything can destroy the
        # process group. Its destructor joins that thread while holding the GIL, here when DDP's
        # reducer is freed on return: a worker still holding a tensor then waited for the GIL
        # forever (rank 0 hung at exit in ~1 of 20 test runs on a loaded 2-core machine; stacks:
        # ~ProcessGroupGloo in std::thread::join, the worker in gil_scoped_acquire under
        # ~AsyncBarrierWork).
        time.sleep(0.5)
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
