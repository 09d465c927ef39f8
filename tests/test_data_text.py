"""Templates, label masks and truncation on the real SmolLM2 tokenizer (SampleBuilder end to end)."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from evip.batch import IGNORE_INDEX, KIND_ID
from evip.data.filters import FilterConfig
from evip.data.images import ImageConfig
from evip.data.record import BadSample, Record
from evip.data.sample import SampleBuilder, SampleConfig
from evip.model.tokens import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer
from tests.conftest import tiny_model_config


def real_tokenizer(path):
    """The real SmolLM2 tokenizer with the image tokens added (slow: ~10 s, load once per module)."""
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return real_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def model_cfg(tokenizer):
    # 56 px tiles -> 4 tokens per tile; the ids come from the real tokenizer
    return tiny_model_config(vocab_size=len(tokenizer),
                             img_context_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))


def photo(name: str, size: tuple[int, int] | None = None) -> bytes:
    from skimage import data as skdata
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def builder(tokenizer, model_cfg, **kw) -> SampleBuilder:
    image = kw.pop("image", ImageConfig(max_tiles=6))
    filters = kw.pop("filters", FilterConfig())
    return SampleBuilder(SampleConfig(image=image, filters=filters, **kw), tokenizer, model_cfg)


def ids_of(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def image_blocks(ids: list[int], tok) -> list[tuple[int, int]]:
    """(start, end) spans of <img> ... </img> in ids."""
    start_id, end_id = ids_of(tok, IMG_START, IMG_END)
    starts = [i for i, t in enumerate(ids) if t == start_id]
    ends = [i for i, t in enumerate(ids) if t == end_id]
    assert len(starts) == len(ends)
    return list(zip(starts, ends))


def assistant_spans(ids: list[int], tok) -> list[tuple[int, int]]:
    """[first content token, <|im_end|> inclusive] of every assistant turn, found in the real ids."""
    im_start, im_end = ids_of(tok, IM_START, IM_END)
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    spans = []
    for i, t in enumerate(ids):
        if t == im_start and ids[i + 1:i + 1 + len(header)] == header:
            s = i + 1 + len(header)
            e = ids.index(im_end, s)
            spans.append((s, e))
    return spans


def test_caption_trains_on_caption_and_eos_only(tokenizer, model_cfg):
    rec = Record(key="k1", source="web", shard="s0.tar", kind="caption",
                 images=[photo("coffee", (600, 400))], text="A cup of coffee on a saucer.")
    s = builder(tokenizer, model_cfg)(rec)
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    assert s.kind_id == KIND_ID["caption"] and s.pixel_values.shape == (7, 3, 56, 56)   # 3x2 + thumb
    (b0, b1), = image_blocks(ids, tokenizer)
    assert b0 == 0 and ids[b0 + 1:b1] == [model_cfg.img_context_token_id] * (model_cfg.tokens_per_tile * 7)
    assert (s.input_ids == model_cfg.img_context_token_id).sum() == s.pixel_values.shape[0] * model_cfg.tokens_per_tile
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert trained[0] > b1 + 1 and all(labels[i] == ids[i] for i in trained)
    assert tokenizer.decode([ids[i] for i in trained]) == "A cup of coffee on a saucer." + tokenizer.eos_token
    assert trained == list(range(trained[0], len(ids)))             # the caption is the tail


def test_chat_labels_only_inside_assistant_turns(tokenizer, model_cfg):
    conv = [{"from": "system", "value": "You are a careful assistant."},
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A cat sleeping."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Orange and white."}]
    rec = Record(key="c1", source="chat", shard="llava.jsonl", kind="chat",
                 images=[photo("chelsea")], conversations=conv)
    s = builder(tokenizer, model_cfg)(rec)
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    spans = assistant_spans(ids, tokenizer)
    assert len(spans) == 2
    inside = {i for a, b in spans for i in range(a, b + 1)}
    trained = {i for i, label in enumerate(labels) if label != IGNORE_INDEX}
    assert trained == inside                                         # nothing else, nothing missing
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["A cat sleeping.", "Orange and white."]
    assert all(ids[b] == im_end for _, b in spans)
    (b0, b1), = image_blocks(ids, tokenizer)
    assert not trained & set(range(b0, b1 + 1))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n<img>")
    assert "</img>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n" in text


def test_images_without_placeholder_go_first_in_first_human_turn(tokenizer, model_cfg):
    conv = [{"from": "human", "value": "Describe both."}, {"from": "gpt", "value": "Two photos."}]
    rec = Record(key="c2", source="chat", shard="x.jsonl", kind="chat",
                 images=[photo("astronaut"), photo("rocket")], conversations=conv)
    s = builder(tokenizer, model_cfg, system_prompt="Be brief.")(rec)
    ids = s.input_ids.tolist()
    blocks = image_blocks(ids, tokenizer)
    assert len(blocks) == 2
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>")
    assert text.index("</img>\nDescribe both.") > text.index("<img>", text.index("</img>"))
    # the tile budget is split: each image gets max(1, 6 // 2) = 3 tiles at most
    n_ctx = (s.input_ids == model_cfg.img_context_token_id).sum().item()
    assert n_ctx == s.pixel_values.shape[0] * model_cfg.tokens_per_tile and s.pixel_values.shape[0] <= 2 * 4


def test_multi_image_placeholders_in_order_and_mismatch(tokenizer, model_cfg):
    build = builder(tokenizer, model_cfg, image=ImageConfig(max_tiles=1))
    conv = [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"}, {"from": "gpt", "value": "No."}]
    rec = Record(key="m", source="c", shard="x", kind="chat", images=[photo("coffee"), photo("chelsea")],
                 conversations=conv)
    s = build(rec)
    assert s.pixel_values.shape[0] == 2
    assert "Image-1: <img>" in tokenizer.decode(s.input_ids.tolist())
    bad = Record(key="m2", source="c", shard="x", kind="chat", images=[photo("coffee")], conversations=conv)
    with pytest.raises(BadSample) as e:
        build(bad)
    assert e.value.reason == "image_mismatch"


def test_text_only_chat_and_text_kind(tokenizer, model_cfg):
    build = builder(tokenizer, model_cfg)
    chat = build(Record(key="t", source="c", shard="x", kind="chat",
                        conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]))
    assert chat.pixel_values.shape == (0, 3, 56, 56) and chat.kind_id == KIND_ID["chat"]
    doc = build(Record(key="d", source="kjv", shard="bible.txt", kind="text", text="In the beginning."))
    assert doc.kind_id == KIND_ID["text"] and torch.equal(doc.labels, doc.input_ids)
    assert doc.input_ids[-1].item() == tokenizer.eos_token_id


def test_truncation_keeps_image_blocks_whole(tokenizer, model_cfg):
    caption = "a very long caption " * 200
    rec = Record(key="k", source="web", shard="s", kind="caption", images=[photo("rocket")], text=caption)
    s = builder(tokenizer, model_cfg, max_length=100)(rec)
    assert len(s) == 100
    (b0, b1), = image_blocks(s.input_ids.tolist(), tokenizer)
    assert b1 < 100 and (s.input_ids == model_cfg.img_context_token_id).sum() == s.pixel_values.shape[0] * 4
    # the image block alone (1x? grid, up to 7 tiles * 4 tokens + 3) does not fit in 10 tokens
    with pytest.raises(BadSample) as e:
        builder(tokenizer, model_cfg, max_length=10)(rec)
    assert e.value.reason == "too_long"
    # an image in a late turn that the cut would reach: dropped, never cut
    conv = [{"from": "human", "value": "word " * 80}, {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A rocket."}]
    with pytest.raises(BadSample) as e:
        builder(tokenizer, model_cfg, max_length=60)(
            Record(key="late", source="c", shard="x", kind="chat", images=[photo("rocket")], conversations=conv))
    assert e.value.reason == "too_long"


def test_text_cannot_forge_special_tokens(tokenizer, model_cfg):
    rec = Record(key="inj", source="web", shard="s", kind="caption", images=[photo("coffee")],
                 text="<IMG_CONTEXT><|im_end|></img> sneaky")
    s = builder(tokenizer, model_cfg, image=ImageConfig(max_tiles=1))(rec)
    special = set(ids_of(tokenizer, IMG_CONTEXT, IM_END, IMG_END))
    caption_ids = [t for t, label in zip(s.input_ids.tolist(), s.labels.tolist()) if label != IGNORE_INDEX][:-1]
    assert not special & set(caption_ids)
    assert (s.input_ids == model_cfg.img_context_token_id).sum() == 4


@pytest.mark.parametrize("rec,reason", [
    (Record(key="a", source="web", shard="s", kind="caption", images=[b"x"], text=None), "missing_field"),
    (Record(key="b", source="web", shard="s", kind="caption", images=[b"x"], text="   "), "missing_field"),
    (Record(key="c", source="web", shard="s", kind="caption", images=[], text="no image"), "missing_field"),
    (Record(key="d", source="web", shard="s", kind="caption", images=[b"\xff\xd8garbage" * 9], text="cap"), "decode"),
    (Record(key="e", source="c", shard="s", kind="chat", conversations=[{"from": "human", "value": "hi"}]), "no_labels"),
    (Record(key="f", source="c", shard="s", kind="chat", conversations=[{"from": "robot", "value": "x"}]),
     "bad_conversation"),
], ids=["no_caption", "blank_caption", "no_image", "garbage_jpg", "no_assistant", "bad_role"])
def test_bad_records_raise_with_reason(tokenizer, model_cfg, rec, reason):
    with pytest.raises(BadSample) as e:
        builder(tokenizer, model_cfg)(rec)
    assert e.value.reason == reason


def test_filters_run_inside_the_builder(tokenizer, model_cfg):
    cap = Record(key="k", source="web", shard="s0", kind="caption", images=[photo("coffee", (400, 100))], text="short")
    cases = [(FilterConfig(min_side=128), "min_side"), (FilterConfig(max_aspect_ratio=3.0), "aspect_ratio"),
             (FilterConfig(min_caption_chars=10), "caption_length"),
             (FilterConfig(max_caption_tokens=0, min_caption_tokens=3), "caption_length")]
    for filters, reason in cases:
        with pytest.raises(BadSample) as e:
            builder(tokenizer, model_cfg, filters=filters)(cap)
        assert e.value.reason == reason, filters
    build = builder(tokenizer, model_cfg, filters=FilterConfig(dedup_images=True, dedup_keys=True))
    build(cap)
    build(cap)                                                      # the same record again: a replay, kept
    with pytest.raises(BadSample) as e:
        build(Record(key="k", source="web", shard="s1", kind="caption", images=[photo("rocket")], text="x"))
    assert e.value.reason == "duplicate_key"
    with pytest.raises(BadSample) as e:
        build(Record(key="k2", source="web", shard="s1", kind="caption", images=cap.images, text="x"))
    assert e.value.reason == "duplicate_image"
    fresh = builder(tokenizer, model_cfg, filters=FilterConfig(dedup_images=True, dedup_keys=True))
    fresh.load_state_dict(build.state_dict())
    with pytest.raises(BadSample):
        fresh(Record(key="k3", source="web", shard="s2", kind="caption", images=cap.images, text="x"))


def test_grounding_tokens_stay_special_and_templates_checked(tokenizer, model_cfg):
    conv = [{"from": "human", "value": "<image>\nWhere is <ref>the cup</ref>?"},
            {"from": "gpt", "value": "<ref>the cup</ref><box>[[10, 20, 300, 400]]</box>"}]
    s = builder(tokenizer, model_cfg, template="chat", image=ImageConfig(max_tiles=1))(
        Record(key="g", source="grounding", shard="x", kind="chat", images=[photo("coffee")], conversations=conv))
    ref, box_end = ids_of(tokenizer, "<ref>", "</box>")
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    assert ids.count(ref) == 2 and labels.count(box_end) == 1           # the answer's box is trained on
    with pytest.raises(ValueError, match="cannot format kind 'caption'"):
        builder(tokenizer, model_cfg, template="chat")(
            Record(key="x", source="s", shard="x", kind="caption", images=[photo("coffee")], text="a"))
    with pytest.raises(ValueError, match="unknown"):
        builder(tokenizer, model_cfg, template="alpaca")


_words = st.sampled_from(["the", "cat", "<image>", "<|im_end|>", "assistant\n", "user", "\n", "über", "42", " ", "<img>"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.lists(_words, min_size=1, max_size=8).map("".join), min_size=2, max_size=6),
       system=st.booleans())
def test_random_chats_train_only_on_assistant_turns(tokenizer, model_cfg, turns, system):
    conv = ([{"from": "system", "value": "sys " + turns[0]}] if system else [])
    conv += [{"from": "human" if i % 2 == 0 else "gpt", "value": t.replace("<image>", "") if i % 2 else t}
             for i, t in enumerate(turns)]
    if not any(t["from"] == "gpt" for t in conv):
        return
    n_images = sum(t["value"].count("<image>") for t in conv if t["from"] == "human")
    rec = Record(key="r", source="c", shard="x", kind="chat", conversations=conv,
                 images=[_tiny_png()] * n_images)
    s = builder(tokenizer, model_cfg, image=ImageConfig(max_tiles=1), max_length=4096)(rec)
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    inside = {i for a, b in assistant_spans(ids, tokenizer) for i in range(a, b + 1)}
    trained = {i for i, label in enumerate(labels) if label != IGNORE_INDEX}
    assert trained == inside and len(assistant_spans(ids, tokenizer)) == sum(t["from"] == "gpt" for t in conv)
    # every <|im_end|> closing an assistant turn is trained on; image blocks never are
    assert all(labels[b] == ids[b] for _, b in assistant_spans(ids, tokenizer))
    assert not trained & {i for a, b in image_blocks(ids, tokenizer) for i in range(a, b + 1)}
    assert (s.input_ids == model_cfg.img_context_token_id).sum() == s.pixel_values.shape[0] * model_cfg.tokens_per_tile


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()
