"""Distributed contrastive losses: on W gloo ranks holding equal shards of a batch, the rank mean of the losses is
the single-process loss of the whole batch, and the rank-averaged parameter gradients (what DDP applies) are the
single-process gradients — logit scale and bias included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distributed_utils import run_on_ranks
from vlkit.losses import ClipLoss, FilipLoss, SigLipLoss

LOCAL_BATCH = 5
IMAGE_TOKENS, TEXT_TOKENS = 4, 6
KINDS = ("clip", "siglip", "filip")


class Towers(nn.Module):
    """Two linear towers into a shared 8-d space, plus a learned temperature and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 8)
        self.text = nn.Linear(5, 8)
        self.log_scale = nn.Parameter(torch.tensor(math.log(4.0)))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1)


def _global_data(world_size: int) -> dict[str, torch.Tensor]:
    batch = LOCAL_BATCH * world_size
    generator = torch.Generator().manual_seed(world_size)
    text_lengths = torch.randint(1, TEXT_TOKENS + 1, (batch,), generator=generator)
    image_lengths = torch.randint(2, IMAGE_TOKENS + 1, (batch,), generator=generator)
    return {
        "image": torch.randn(batch, 6, generator=generator),
        "text": torch.randn(batch, 5, generator=generator),
        "image_tokens": torch.randn(batch, IMAGE_TOKENS, 6, generator=generator),
        "text_tokens": torch.randn(batch, TEXT_TOKENS, 5, generator=generator),
        "text_mask": torch.arange(TEXT_TOKENS)[None] < text_lengths[:, None],  # (B, T), right padding
        "image_mask": torch.arange(IMAGE_TOKENS)[None] < image_lengths[:, None],  # (B, N), packed-style padding
    }


def _loss_and_grads(kind: str, data: dict[str, torch.Tensor], distributed: bool) -> tuple[float, dict]:
    torch.manual_seed(0)  # the same replicated parameters on every rank and in the single process
    model = Towers()
    scale = model.log_scale.exp()
    if kind == "filip":
        image, text = model(data["image_tokens"], data["text_tokens"])
        loss = FilipLoss(chunk_size=2, distributed=distributed)(
            image, text, scale, model.bias, text_mask=data["text_mask"], image_mask=data["image_mask"]
        )
    else:
        image, text = model(data["image"], data["text"])
        loss_fn = (
            SigLipLoss(chunk_size=2, distributed=distributed) if kind == "siglip" else ClipLoss(distributed=distributed)
        )
        loss = loss_fn(image, text, scale, model.bias)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}
    return float(loss.detach()), grads


def _rank_check(rank: int, world_size: int) -> dict[str, dict]:
    shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    data = {name: value[shard] for name, value in _global_data(world_size).items()}
    results = {}
    for kind in KINDS:
        loss, grads = _loss_and_grads(kind, data, distributed=True)
        for grad in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(grad)
            grad /= world_size
        local_loss, _ = _loss_and_grads(kind, data, distributed=False)
        results[kind] = {"loss": loss, "grads": grads, "local_loss": local_loss}
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_on_ranks(_rank_check, request.param)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_mean_loss_and_averaged_grads_equal_single_process(ranks: tuple[int, list[dict]], kind: str) -> None:
    world_size, results = ranks
    expected_loss, expected_grads = _loss_and_grads(kind, _global_data(world_size), distributed=True)
    per_rank = [result[kind]["loss"] for result in results]
    assert sum(per_rank) / world_size == pytest.approx(expected_loss, abs=1e-5)
    # The shards differ, so the per-rank losses do too: the check above is not satisfied trivially.
    assert max(per_rank) - min(per_rank) > 1e-3
    for name, want in expected_grads.items():
        assert want.abs().max() > 0 or name == "bias", name
        for rank, result in enumerate(results):
            torch.testing.assert_close(
                result[kind]["grads"][name], want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, r=rank: f"{n}@{r}: {m}"
            )


@pytest.mark.parametrize("kind", KINDS)
def test_opt_out_scores_only_the_local_shard(ranks: tuple[int, list[dict]], kind: str) -> None:
    # distributed=False inside a process group: each rank's loss is the single-process loss of its shard alone,
    # which differs from the globally coupled loss (more negatives).
    world_size, results = ranks
    global_data = _global_data(world_size)
    for rank, result in enumerate(results):
        shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        shard_loss, _ = _loss_and_grads(kind, {k: v[shard] for k, v in global_data.items()}, distributed=True)
        assert result[kind]["local_loss"] == pytest.approx(shard_loss, abs=1e-6)
        assert abs(result[kind]["local_loss"] - result[kind]["loss"]) > 1e-3


class _Packed:
    """What navit_step reads of a packed batch besides the model's outputs."""

    padding_fraction = torch.tensor(0.0)
    images_per_sequence = torch.tensor([2.0])

    @classmethod
    def from_dict(cls, batch: dict) -> _Packed:
        return cls()


def _navit_unequal_shards(rank: int, world_size: int) -> list[float]:
    """Rank r packed 4 - 2r images (each rank keeps what fits its sequences): the step trains on equal shards."""
    from types import SimpleNamespace

    from vlkit.tasks import navit

    navit.PackedImages = _Packed  # type: ignore[misc, assignment]
    generator = torch.Generator().manual_seed(rank)
    rows = 4 - 2 * rank
    features = [F.normalize(torch.randn(rows, 8, generator=generator), dim=-1) for _ in range(2)]

    def model(packed: object, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(image_features=features[0], text_features=features[1],
                               logit_scale=torch.tensor(10.0), logit_bias=None)  # fmt: skip

    losses = []
    for loss_fn in (ClipLoss(), SigLipLoss()):
        losses.append(float(navit.navit_step(loss_fn)(model, {"input_ids": None, "attention_mask": None}).loss))
    return losses


def test_packed_ranks_with_different_image_counts_train_on_equal_shards() -> None:
    rank0, rank1 = run_on_ranks(_navit_unequal_shards, 2)
    assert all(math.isfinite(loss) for loss in rank0 + rank1)
