"""The packed micro-batch: the one contract between the data pipeline and the model.

A batch is a plain dict of tensors (so DataLoader collation, pinning and `.to()` just work):

    input_ids     LongTensor [B, T]   token ids; several whole samples packed per row; pad = pad_token_id
    labels        LongTensor [B, T]   target of position t is labels[t] (HF convention: the model shifts);
                                      -100 where no loss (image, system, user, padding tokens)
    position_ids  LongTensor [B, T]   restart at 0 at every sample start
    seq_ids       LongTensor [B, T]   index of the sample within its row, -1 for padding;
                                      attention never crosses a change of seq_id, nor does the shifted loss
    kind_ids      LongTensor [B, T]   sample kind per token: 0 caption, 1 chat, 2 text-only (-1 padding)
    pixel_values  ByteTensor [N, 3, S, S]   every tile of every image in the batch, in order of appearance
                                      (row-major over B then T); N may be 0 (then shape [0, 3, S, S]).
                                      uint8 RGB (0..255, not normalised): 4x less worker -> trainer
                                      shared memory and host -> device traffic than fp32. The model
                                      normalises on its device (ImageNet mean/std in fp32, then its
                                      dtype; evip.model.vision.normalise_pixels). A float tensor is
                                      still accepted and taken as already normalised. Do not `.to(dtype)`
                                      uint8 pixels yourself (that skips the normalisation).

The image-token mask is `input_ids == img_context_token_id`; its count must equal
N * tokens_per_tile, and the model checks it.

The data loader adds one more entry, computed on its CPU workers:

    layout        PackedLayout (evip/model/layout.py): the text/image token positions, labelled
                  positions and targets, `cu_seqlens` and its longest segment of this batch, so
                  the forward needs no device -> host sync to find them. Moved with the batch
                  (`.to(device, non_blocking=True)`, pinned with it). Optional: without it the
                  model computes the same values itself (generate, evals of hand-made batches,
                  tests). Whoever changes input_ids, labels or seq_ids must drop it.
"""
from __future__ import annotations

KINDS = ("caption", "chat", "text")
KIND_ID = {k: i for i, k in enumerate(KINDS)}
IGNORE_INDEX = -100
TENSOR_KEYS = ("input_ids", "labels", "position_ids", "seq_ids", "kind_ids", "pixel_values")   # the packer's
LAYOUT_KEY = "layout"
BATCH_KEYS = TENSOR_KEYS + (LAYOUT_KEY,)                                                         # the loader's
