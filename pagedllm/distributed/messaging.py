"""Point-to-point messages between rank 0 (the engine's process) and the other ranks of a replica.

Rank 0 posts each command to every other rank without waiting (isend), so that while a pipeline's
later stages still work on one micro-batch it can already run the next; a command is a header
[kind, payload length] and an int64 payload (a packed StepInputs, or a pickled call). Replies and
logits come back to rank 0 on their own tag. gloo sends CPU tensors, NCCL device ones.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

CMD_STEP, CMD_CALL, CMD_STOP = 0, 1, 2
TAG_DATA, TAG_REPLY = 0, 1


class Pending:
    """Sends in progress; their tensors must stay alive until they complete."""

    def __init__(self):
        self.works: list = []
        self.tensors: list[torch.Tensor] = []

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = TAG_DATA) -> None:
        self.tensors.append(tensor)
        self.works.append(dist.isend(tensor, dst, tag=tag))

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.tensors = [], []


def post_command(kind: int, payload: torch.Tensor, ranks: range, device: torch.device) -> Pending:
    pending = Pending()
    header = torch.tensor([kind, payload.numel()], device=device)
    payload = payload.to(device)
    for rank in ranks:
        pending.isend(header, rank)
        if payload.numel():
            pending.isend(payload, rank)
    return pending


def recv_command(device: torch.device) -> tuple[int, torch.Tensor]:
    header = torch.zeros(2, dtype=torch.long, device=device)
    dist.recv(header, 0, tag=TAG_DATA)
    kind, n = header.tolist()
    payload = torch.zeros(n, dtype=torch.long, device=device)
    if n:
        dist.recv(payload, 0, tag=TAG_DATA)
    return kind, payload.cpu()


def pickled(obj) -> torch.Tensor:
    """Any picklable object as an int64 tensor (padded to whole words) that travels like a packed step."""
    data = pickle.dumps(obj)
    data += b"\0" * (-len(data) % 8)
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


def unpickled(payload: torch.Tensor):
    return pickle.loads(payload.numpy().tobytes())


def send_object(obj, dst: int, device: torch.device) -> None:
    payload = pickled(obj).to(device)
    dist.send(torch.tensor([payload.numel()], device=device), dst, tag=TAG_REPLY)
    dist.send(payload, dst, tag=TAG_REPLY)


def recv_object(src: int, device: torch.device):
    n = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(n, src, tag=TAG_REPLY)
    payload = torch.zeros(int(n), dtype=torch.long, device=device)
    dist.recv(payload, src, tag=TAG_REPLY)
    return unpickled(payload.cpu())
