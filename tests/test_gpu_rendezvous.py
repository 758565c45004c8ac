"""Trainer ranks meet at rank 0's torch.distributed store, which rank 0 holds open from the moment
the OS gave it a port (no window for another process to take the port), and NCCL runs over it.
Needs only torch and two GPUs: pytest -m gpu tests/test_gpu_rendezvous.py."""

import hashlib

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)"),
]


def _rank(rank: int, world: int, port_q, port: int | None, out_q) -> None:
    import os

    import torch.distributed as dist

    from detrl.megatron.store import tcp_store

    os.environ["NCCL_ALGO"] = "Ring"
    torch.cuda.set_device(rank)
    if rank == 0:
        store = tcp_store("127.0.0.1", 0, world, is_master=True)
        port_q.put(store.port)
    else:
        store = tcp_store("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1 << 20, generator=g).cuda()
    dist.all_reduce(x)
    torch.cuda.synchronize()
    out_q.put((rank, hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()))
    dist.destroy_process_group()


def test_ranks_meet_at_rank_0s_held_store_and_all_reduce_over_nccl():
    ctx = mp.get_context("spawn")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    p0 = ctx.Process(target=_rank, args=(0, 2, port_q, None, out_q))
    p0.start()
    port = port_q.get(timeout=120)
    p1 = ctx.Process(target=_rank, args=(1, 2, port_q, port, out_q))
    p1.start()
    got = dict(out_q.get(timeout=300) for _ in range(2))
    for p in (p0, p1):
        p.join(60)
        assert p.exitcode == 0
    expected = sum(torch.randn(1 << 20, generator=torch.Generator().manual_seed(r)) for r in range(2))
    assert got[0] == got[1] == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
