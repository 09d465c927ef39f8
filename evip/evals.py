"""Evals during a stage (every `eval.every_steps` and at the stage's end), on every rank together:

- held-out caption loss: the first `heldout_batches` batches of a held-out DataConfig (the same
  batches every time: a fresh loader each eval);
- forgetting monitor: loss of the model on a real text corpus (CPython's `pydoc_data.topics` by
  default, no download), reported with its change vs the stage's start and vs the base LLM (the
  first stage's start); through S1.1-S1.2 the change is exactly 0 (the LLM is frozen);
- a few greedy captions of fixed images.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.distributed as dist

from evip.batch import KIND_ID


def corpus_text(name: str, max_chars: int = 200_000) -> str:
    if name == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"eval.text_corpus {name!r} is neither 'pydoc' nor a text file")
    return path.read_text(errors="replace")[:max_chars]


def text_batches(tokenizer, model_cfg, corpus: str, seq_len: int, n: int, rank: int, world_size: int):
    """n batches [1, seq_len] of consecutive corpus tokens for this rank (kind 'text'). Every rank
    gets the same number (fewer than n when the corpus is short): under ZeRO-3 a forward is a
    collective, and a rank with one forward more would wait for the others forever."""
    ids = tokenizer(corpus_text(corpus), add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)]
    per_rank = min(n, len(chunks) // world_size)
    if per_rank == 0:
        raise ValueError(f"eval.text_corpus {corpus!r} holds {len(ids)} tokens: fewer than one eval.text_seq_len="
                         f"{seq_len} chunk per rank ({world_size} ranks); use a longer corpus or a shorter "
                         f"eval.text_seq_len")
    for chunk in chunks[: per_rank * world_size][rank::world_size]:
        x = torch.tensor([chunk])
        yield {"input_ids": x, "labels": x.clone(), "position_ids": torch.arange(seq_len)[None],
               "seq_ids": torch.zeros_like(x), "kind_ids": torch.full_like(x, KIND_ID["text"])}   # no images


@torch.no_grad()
def mean_loss(engine, batches) -> float:
    """Token-weighted mean loss over every rank's batches."""
    acc = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.eval()
    try:
        for b in batches:
            out = engine(**{k: v.to(engine.device) for k, v in b.items()}, return_logits=False)
            acc[0] += out.loss_sum.double()
            acc[1] += out.num_tokens.double()
    finally:
        engine.train()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(acc)
    acc = acc.cpu()
    return (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")


def other_images(batch: dict, tokens_per_tile: int, img_context_id: int) -> torch.Tensor:
    """The batch's pixel_values with every image replaced by the next image in the batch that has
    as many tiles (cyclically), so each caption is scored against another picture with the same
    token layout. An image is a run of <IMG_CONTEXT> tokens (images are delimited by <img> and
    </img>, so runs never merge); tiles follow the images in row-major token order, as the model
    reads them. An image with no same-size partner keeps its own tiles."""
    ids = batch["input_ids"].reshape(-1)
    is_img = (ids == img_context_id).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
    tiles = ((ends - starts) // tokens_per_tile).tolist()
    first = list(itertools.accumulate(tiles, initial=0))       # each image's first tile
    by_size: dict[int, list[int]] = {}
    for i, n in enumerate(tiles):
        by_size.setdefault(n, []).append(i)
    pixels = batch["pixel_values"]
    out = pixels.clone()
    for n, images in by_size.items():
        for a, b in zip(images, images[1:] + images[:1]):
            out[first[a]:first[a] + n] = pixels[first[b]:first[b] + n]
    return out


def load_image(path: str, size: int) -> torch.Tensor:
    """One tile [1, 3, size, size], ImageNet-normalised."""
    import numpy as np
    from PIL import Image
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((x - mean) / std)[None]


class Evaluator:
    def __init__(self, tokenizer, model_cfg, rank: int, world_size: int, metrics, run_dir: Path,
                 loader_factory=None, seed: int = 0):
        self.tok, self.model_cfg, self.rank, self.world_size = tokenizer, model_cfg, rank, world_size
        self.metrics, self.run_dir = metrics, Path(run_dir)
        self.start_text_loss = None
        self.base_text_loss = None

    def _text_loss(self, engine, stage) -> float | None:
        if self.tok is None or not stage.eval.text_corpus:
            return None
        return mean_loss(engine, text_batches(self.tok, self.model_cfg, stage.eval.text_corpus,
                                              stage.eval.text_seq_len, stage.eval.text_batches,
                                              self.rank, self.world_size))

    def stage_start(self, engine, stage, stage_dir: Path) -> None:
        """The text-only loss at the stage's start, computed once (kept in the stage dir for resumes)."""
        f = stage_dir / "eval_start.json"
        base_f = self.run_dir / "eval_base.json"
        if f.is_file():
            self.start_text_loss = json.loads(f.read_text())["text_loss"]
        else:
            self.start_text_loss = self._text_loss(engine, stage)
            if self.rank == 0:
                f.write_text(json.dumps({"text_loss": self.start_text_loss}))
                if not base_f.is_file():
                    base_f.write_text(json.dumps({"text_loss": self.start_text_loss}))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.base_text_loss = json.loads(base_f.read_text())["text_loss"] if base_f.is_file() else None

    def evaluate(self, engine, stage, step: int, final: bool = False) -> dict:
        values: dict = {"final": final}
        text = self._text_loss(engine, stage)
        if text is not None:
            values["text_loss"] = text
            if self.start_text_loss is not None:
                values["text_loss_change_vs_stage_start"] = text - self.start_text_loss
            if self.base_text_loss is not None:
                values["text_loss_change_vs_base"] = text - self.base_text_loss
        if stage.eval.heldout_data is not None and self.tok is not None:
            from evip.data.loader import build_loader
            loader = build_loader(stage.eval.heldout_data, self.tok, self.model_cfg, self.rank, self.world_size)
            it = iter(loader)
            batches = [next(it) for _ in range(stage.eval.heldout_batches)]
            values["heldout_caption_loss"] = mean_loss(engine, batches)
            # the same captions, each under another picture: how much the model relies on the image
            other = [b | {"pixel_values": other_images(b, self.model_cfg.tokens_per_tile,
                                                       self.model_cfg.img_context_token_id)} for b in batches]
            values["heldout_caption_loss_other_image"] = mean_loss(engine, other)
            values["image_gain"] = values["heldout_caption_loss_other_image"] - values["heldout_caption_loss"]
        if stage.eval.caption_images and self.tok is not None:
            values["captions"] = self.captions(engine, stage)
        if self.metrics is not None:
            self.metrics.log_eval(stage.name, step, values)
        return values

    @torch.no_grad()
    def captions(self, engine, stage) -> list[str]:
        from evip.model.tokens import IMG_CONTEXT, IMG_END, IMG_START
        cfg = self.model_cfg
        out = []
        engine.eval()
        try:
            for path in stage.eval.caption_images:
                prompt = IMG_START + IMG_CONTEXT * cfg.tokens_per_tile + IMG_END + "\n" + stage.eval.caption_prompt
                ids = torch.tensor([self.tok(prompt, add_special_tokens=False)["input_ids"]], device=engine.device)
                pixels = load_image(path, cfg.image_size).to(engine.device, engine.module.tok_embeddings.weight.dtype)
                new = engine.module.generate(ids, pixels, max_new_tokens=stage.eval.caption_max_new_tokens,
                                             eos_token_id=self.tok.eos_token_id)
                out.append(self.tok.decode(new[0], skip_special_tokens=True))
        finally:
            engine.train()
        return out
