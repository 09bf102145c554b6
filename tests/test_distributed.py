"""Multi-process training through PyTorch's own DDP (gloo on CPU, two ranks).

A model built on the fused layers, wrapped in DistributedDataParallel, must take the same
step as the same model built from plain PyTorch layers."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from effnet_kernels.nn import DepthwiseConvBNAct
from effnet_kernels.nn.batchnorm import convert_sync_batchnorm

WORLD = 2


def plain_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False),
        nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def fused_model(plain: nn.Sequential) -> nn.Sequential:
    model = copy.deepcopy(plain)
    dw = DepthwiseConvBNAct.from_modules(model[1], model[2], model[3])
    return nn.Sequential(model[0], dw, model[4], model[5], model[6])


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(4, 3, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,), generator=gen)
    plain = plain_model()
    fused = fused_model(plain)
    results[rank] = (train_step(plain, x, y), train_step(fused, x, y))
    results[f"sync{rank}"] = sync_forward_backward(rank)
    dist.destroy_process_group()


def sync_batch(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * WORLD, 6, 9, 9, generator=gen, dtype=torch.float64)
    dy = torch.randn(2 * WORLD, 6, 5, 5, generator=gen, dtype=torch.float64)
    return x, dy


def sync_layer() -> nn.Module:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False).double()
    return nn.Sequential(conv, nn.BatchNorm2d(6).double(), nn.SiLU())


def sync_forward_backward(rank: int):
    """This rank's half of the batch through a fused layer with SyncBatchNorm."""
    plain = convert_sync_batchnorm(sync_layer())
    assert isinstance(plain[1], nn.SyncBatchNorm)
    fused = DepthwiseConvBNAct.from_modules(plain[0], plain[1], plain[2]).train()
    x, dy = sync_batch()
    x = x[2 * rank:2 * rank + 2].clone().requires_grad_()
    out = fused(x)
    out.backward(dy[2 * rank:2 * rank + 2])
    return (out.detach(), x.grad, fused.conv.weight.grad, fused.bn.weight.grad,
            fused.bn.running_mean.clone(), fused.bn.running_var.clone())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> dict:
    """Runs both ranks once; each test reads its part."""
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(worker, args=(free_port(), shared), nprocs=WORLD, join=True)
        return dict(shared)


def test_ddp_step_matches_plain_pytorch(results):
    plain0, fused0 = results[0]
    plain1, fused1 = results[1]
    for a, b, c, d in zip(plain0, plain1, fused0, fused1):
        torch.testing.assert_close(a, b)  # DDP keeps ranks in sync
        torch.testing.assert_close(c, d)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)  # fused == plain


def test_sync_batchnorm_matches_full_batch(results):
    """Two ranks with half a batch each == one process with the whole batch."""
    layer = sync_layer().train()
    x, dy = sync_batch()
    x.requires_grad_()
    out = layer(x)
    out.backward(dy)
    halves = [results[f"sync{r}"] for r in range(WORLD)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), out.detach())
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), x.grad)
    # Weight gradients are local sums (DDP averages them across ranks).
    torch.testing.assert_close(sum(h[2] for h in halves), layer[0].weight.grad)
    torch.testing.assert_close(sum(h[3] for h in halves), layer[1].weight.grad)
    for h in halves:
        torch.testing.assert_close(h[4], layer[1].running_mean)
        torch.testing.assert_close(h[5], layer[1].running_var)
