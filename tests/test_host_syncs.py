"""Fewer host syncs per forward.

The text/image routing comes from one stable sort split at the image-token count the embedding
already reads (no `nonzero` per index set), with the same indices. And on the training path the
data loader's workers compute the batch's layout (evip/model/layout.py: routing, labelled
positions, cu_seqlens, max_seqlen) on the CPU, so the model's forward and backward in a real
`StageTrainer.train_step` make no device -> host sync at all; without the layout the same step
makes 3 per micro-batch on CPU's SDPA path (4 on varlen/flash: cu_seqlens and its max).

A CPU has no syncs to observe, so `HostSyncs` counts the torch calls that *are* one on a GPU,
made by evip's model code (evip/model/), by call site. bench/gpu_check.py counts the real ones
with CUDA's sync debug mode.
"""
from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.overrides import TorchFunctionMode

from conftest import tiny_model_config
from data_stream_helpers import data_config, make_shards, model_config_for, real_tokenizer, write_recipe
from evip.batch import LAYOUT_KEY, TENSOR_KEYS
from evip.model.layout import PackedLayout
from evip.model.loss import labelled_positions
from evip.model.mono import MonoInternVL
from evip.model.packed_attention import cu_seqlens, packed_context
from evip.model.routing import Routing

MODEL_DIR = str(Path(__file__).resolve().parents[1] / "evip" / "model")

# calls whose result the host must wait for on a GPU (a value read back, or a data-dependent size)
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive", "bincount", "cpu", "numpy"}


def _is_sync(name: str, args, kwargs) -> bool:
    if name in READS:
        return True
    if name in ("tensor", "as_tensor"):                   # built on the host, a blocking copy to a GPU
        return kwargs.get("device") is not None
    if name == "to":                                      # a blocking copy to another device
        moves = kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])
        return moves and not kwargs.get("non_blocking", False)
    if name in ("__getitem__", "__setitem__"):            # boolean-mask indexing: a data-dependent size
        idx = args[1] if len(args) > 1 else None
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (idx if isinstance(idx, tuple) else (idx,)))
    return False


class HostSyncs(TorchFunctionMode):
    """Counts the would-be host syncs made from evip/model/ code, as Counter{"file.py:line": n}."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(getattr(func, "__name__", ""), args, kwargs):
            f = sys._getframe(1)
            while f is not None and not f.f_code.co_filename.startswith(MODEL_DIR):
                f = f.f_back
            if f is not None:
                self.sites[f"{Path(f.f_code.co_filename).name}:{f.f_lineno}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64), st.integers(1, 3))
def test_routing_from_one_sort_equals_nonzero(bits, rows):
    mask = torch.tensor(bits * rows).view(rows, -1)
    flat = mask.reshape(-1)
    for r in (Routing.from_mask(mask), Routing.from_mask(mask, int(flat.sum()))):
        assert torch.equal(r.text_idx, (~flat).nonzero().squeeze(1))
        assert torch.equal(r.image_idx, flat.nonzero().squeeze(1))


def test_the_counter_sees_the_syncs_of_a_plain_context():
    """varlen/flash without a layout: the segment count (nonzero) and max_seqlen (.item()); with one: none."""
    seq = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    layout = PackedLayout.of(torch.ones_like(seq), torch.ones_like(seq), seq, img_context_token_id=7)
    with HostSyncs() as plain:
        ctx = packed_context(seq, "varlen")
    with HostSyncs() as precomputed:
        ctx2 = packed_context(seq, "varlen", layout)
    assert plain.total == 2 and precomputed.total == 0
    assert torch.equal(ctx.cu_seqlens, ctx2.cu_seqlens) and ctx.max_seqlen == ctx2.max_seqlen == 6
    assert torch.equal(layout.cu_seqlens, cu_seqlens(seq))


def _packed_batch(cfg, g):
    """Two rows: an image sample + a text sample, and one whole sample (seq_ids restart per row)."""
    t, tpt = 24, cfg.tokens_per_tile
    ids = torch.randint(1, cfg.img_context_token_id, (2, t), generator=g)
    ids[0, 1:1 + tpt] = cfg.img_context_token_id
    ids[1, 2:2 + tpt] = cfg.img_context_token_id
    labels = ids.clone()
    labels[0, :1 + tpt] = -100
    labels[1, :2 + tpt] = -100
    labels[0, 20:] = -100
    seq = torch.zeros(2, t, dtype=torch.long)
    seq[0, 12:20], seq[0, 20:] = 1, -1
    pos = torch.cat([torch.arange(12), torch.arange(8), torch.arange(4)])[None].repeat(2, 1)
    pos[1] = torch.arange(t)
    kind = torch.where(seq == 1, 2, 0)
    kind[seq < 0] = -1
    pix = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq, "kind_ids": kind,
            "pixel_values": pix}


@pytest.mark.parametrize("return_logits", [True, False])
def test_forward_with_the_layout_is_bit_identical_and_sync_free(return_logits):
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    batch = _packed_batch(cfg, torch.Generator().manual_seed(1))
    layout = PackedLayout.of(batch["input_ids"], batch["labels"], batch["seq_ids"], cfg.img_context_token_id)
    assert torch.equal(layout.loss_idx, labelled_positions(batch["labels"], batch["seq_ids"])[0])
    runs = {}
    for name, extra in (("plain", {}), ("layout", {"layout": layout})):
        model.zero_grad(set_to_none=True)
        with HostSyncs() as syncs:
            out = model(**batch, **extra, return_logits=return_logits)
            out.loss.backward()
        runs[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, syncs)
    (a, ga, sa), (b, gb, sb) = runs["plain"], runs["layout"]
    for key in ("loss", "loss_sum", "num_tokens", "kind_loss_sum", "kind_num_tokens") + (("logits",) if return_logits else ()):
        assert torch.equal(a[key], b[key]), key
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    assert sa.total == 3, sa.sites      # image-token count, one-sample-rows test, labelled positions
    assert sb.total == 0, sb.sites


def test_layout_errors_name_the_fix():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    batch = _packed_batch(cfg, torch.Generator().manual_seed(1))
    layout = PackedLayout.of(batch["input_ids"][:1], batch["labels"][:1], batch["seq_ids"][:1], cfg.img_context_token_id)
    with pytest.raises(ValueError, match="recompute it"):
        model(**batch, layout=layout)


# ---- the real training step: the real loader's batches through StageTrainer.train_step ----------

def _trainer(tmp: Path, model_cfg, batches):
    from evip import stage_weights
    from evip.config import load_config
    from evip.stages import StageConfig
    from evip.trainer import StageContext, StageTrainer
    torch.manual_seed(0)
    weights = tmp / "model.safetensors"
    stage_weights.write_weights({n: p.detach() for n, p in MonoInternVL(model_cfg).named_parameters()}, weights)
    stage = load_config(StageConfig, None, ["name=syncs", "trainable=[all]", "steps=100", "zero_stage=0",
                                            "precision=fp32", "grad_accum=2", "data.recipe=unused",
                                            "schedule.kind=constant", "eval.text_corpus=''"])
    ctx = StageContext(stage=stage, source="tests/test_host_syncs.py", index=0, stage_dir=tmp / "stage",
                       input_weights=weights, model_cfg=model_cfg, make_loader=lambda: _Listed(batches))
    trainer = StageTrainer(ctx)
    trainer.build()
    return trainer


class _Listed:
    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __iter__(self):
        while True:
            yield self.batches[self.index % len(self.batches)]
            self.index += 1

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def test_training_step_forward_and_backward_make_no_host_sync(tmp_path, monkeypatch):
    from evip.data.loader import build_loader
    from evip.distributed import free_port, init_distributed
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    init_distributed()                      # one gloo process (harmless when a test already made one)
    make_shards(tmp_path / "d", "a", 1, 12)
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "a", "paths": [str(tmp_path / "d" / "a-00000.tar")]}])
    tok = real_tokenizer()
    model_cfg = model_config_for(tok)
    it = iter(build_loader(data_config(recipe, num_workers=0), tok, model_cfg, 0, 1))
    batches = [next(it) for _ in range(4)]
    for b in batches:                       # the loader's workers ship the layout of the very batch
        assert b[LAYOUT_KEY] == PackedLayout.of(b["input_ids"], b["labels"], b["seq_ids"],
                                                model_cfg.img_context_token_id)
        assert b[LAYOUT_KEY].image_idx.numel() > 0
    plain = [{k: b[k] for k in TENSOR_KEYS} for b in batches]
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        trainer = _trainer(Path(d), model_cfg, batches + plain)
        data = iter(trainer.loader)
        counts, losses = [], []
        for _ in range(4):                  # steps 0, 1: the loader's batches; 2, 3: the same without layout
            with HostSyncs() as syncs:
                stats, _ = trainer.train_step(data)
            counts.append(syncs)
            losses.append(stats["loss"])
        trainer.close()
    assert [s.total for s in counts[:2]] == [0, 0], [dict(s.sites) for s in counts[:2]]
    per_micro_batch = 3                     # image-token count, one-sample-rows test, labelled positions
    assert [s.total for s in counts[2:]] == [2 * per_micro_batch] * 2, [dict(s.sites) for s in counts[2:]]
    assert all(l == l for l in losses)
