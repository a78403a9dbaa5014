"""Malformed data never stops a run: every malformed field of every format is a counted
BadSample with a reason, a bad image drops only that image, the pixel limit is ours, 16-bit
images decode right, small shards are judged, and random mutations of real samples of every
format never raise."""

import io
import json
import os
import random

import numpy as np
import pytest
import shardkit


def two_image_mmc4(**entry0) -> dict:
    """An MMC4 sample with two good images (0 inline, 1 a member); `entry0` overrides fields of
    image 0's entry (None deletes the field)."""
    sample = shardkit.mmc4_doc(0)
    meta = json.loads(sample["json"])
    for k, v in entry0.items():
        if v is None:
            meta["image_info"][0].pop(k, None)
        else:
            meta["image_info"][0][k] = v
    sample["json"] = json.dumps(meta)
    return sample


MMC4_CASES = {  # image 0's entry -> the reason it is dropped
    "matched_sim null": ({"matched_sim": "__null__"}, "bad_field"),
    "matched_sim text": ({"matched_sim": "high"}, "bad_field"),
    "matched_sim bool": ({"matched_sim": True}, "bad_field"),
    "base64 not text": ({"image_base64": 12345}, "bad_field"),
    "base64 undecodable": ({"image_base64": "!!!not base64"}, "undecodable_image"),
    "index out of range": ({"matched_text_index": 7}, "bad_field"),
    "index negative": ({"matched_text_index": -1}, "bad_field"),
    "index text": ({"matched_text_index": "1"}, "bad_field"),
    "index missing": ({"matched_text_index": None}, "missing_key"),
    "name not text": ({"image_name": ["a"], "image_base64": None}, "bad_field"),
    "member missing": ({"image_name": "nowhere.jpg", "image_base64": None}, "missing_key"),
}


def _fix_null(sample: dict) -> dict:
    sample["json"] = sample["json"].replace('"__null__"', "null")
    return sample


@pytest.mark.parametrize("case", list(MMC4_CASES))
def test_a_bad_mmc4_image_entry_drops_only_that_image(case, tmp_path, tokenizer):
    from flamingo_dist.data.formats import BadSample, Media, parse

    fields, reason = MMC4_CASES[case]
    sample = _fix_null(two_image_mmc4(**fields))
    doc = parse("mmc4", sample, random.Random(0), min_sim=0.24)
    assert [it.name for it in doc.items if isinstance(it, Media)] == ["img1.jpg"]
    assert [e.reason for e in doc.dropped] == [reason]
    # the same through training's stream: the document is used, the image counted under its reason
    shard = shardkit.write_tar(str(tmp_path / "m-00000.tar"), [sample, shardkit.mmc4_doc(1)])
    keys, counts = shardkit.one_pass("mmc4", [shard], tokenizer)
    assert keys == ["mmc4_0", "mmc4_1"]
    assert counts["images_dropped"] == counts[f"images_dropped/{reason}"] == 1
    # a document whose only image has the fault is skipped under that reason
    alone = json.loads(sample["json"])
    alone["image_info"] = alone["image_info"][:1]
    with pytest.raises(BadSample) as e:
        parse("mmc4", {**sample, "json": json.dumps(alone)}, random.Random(0), min_sim=0.24)
    assert e.value.reason == reason


@pytest.mark.parametrize("meta,reason", [
    ({"text_list": "one sentence .", "image_info": []}, "bad_field"),
    ({"text_list": ["one .", 5], "image_info": []}, "bad_field"),
    ({"image_info": []}, "missing_key"),
    ({"text_list": ["one ."], "image_info": {"0": 1}}, "bad_field"),
])
def test_malformed_mmc4_documents_are_bad_fields(meta, reason):
    from flamingo_dist.data.formats import BadSample, parse

    sample = shardkit.mmc4_doc(0)
    info = json.loads(sample["json"])["image_info"]
    if isinstance(meta.get("image_info"), list):
        meta["image_info"] = info
    with pytest.raises(BadSample) as e:
        parse("mmc4", {**sample, "json": json.dumps(meta)}, random.Random(0))
    assert e.value.reason == reason


def test_obelics_bad_image_entries_drop_only_that_image_and_bad_texts_are_bad_fields():
    from flamingo_dist.data.formats import BadSample, Media, parse

    good = shardkit.image_bytes(0)

    def sample(texts, images):
        return {"__key__": "d", "json": json.dumps({"texts": texts, "images": images}), "a.jpg": good}

    doc = parse("obelics", sample(["x .", None, None, None], [None, "a.jpg", 7, "gone.jpg"]), random.Random(0))
    assert sum(isinstance(it, Media) for it in doc.items) == 1
    assert [e.reason for e in doc.dropped] == ["bad_field", "missing_key"]
    for texts, images in ([["x .", 3], ["a.jpg", None]], [[False, None], [None, "a.jpg"]], ["x .", ["a.jpg"]]):
        with pytest.raises(BadSample) as e:
            parse("obelics", sample(texts, images), random.Random(0))
        assert e.value.reason == "bad_field", (texts, images)


def test_the_pixel_limit_is_ours_not_pils(monkeypatch):
    """PIL refuses images over twice its own MAX_IMAGE_PIXELS (89M by default, so 179M) as
    'decompression bombs'; ours (data.max_image_pixels) decides, above or below it. Shown with
    PIL's limit made small, so the test images stay small."""
    from PIL import Image

    from flamingo_dist.data.formats import BadSample
    from flamingo_dist.data.processing import Limits, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64x64 = 4096 > 2 x 500: PIL alone refuses it
    data = shardkit.image_bytes(0, "PNG", side=64)
    assert open_image(data, 32, Limits(max_image_pixels=64 * 64)).size == (64, 64)
    with pytest.raises(BadSample) as e:
        open_image(data, 32, Limits(max_image_pixels=64 * 64 - 1))
    assert e.value.reason == "image_too_large" and "data.max_image_pixels" in str(e.value)


def test_16_bit_images_decode_to_their_8_bit_values():
    from PIL import Image

    from flamingo_dist.data.formats import Media
    from flamingo_dist.data.processing import MediaDecoder

    ramp8 = np.tile(np.arange(256, dtype=np.uint8), (32, 1))
    ramp16 = ramp8.astype(np.uint16) * 257  # the same ramp at 16 bits

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    decode = MediaDecoder(32)
    wide, narrow = decode(Media([png(ramp16)])), decode(Media([png(ramp8)]))
    assert Image.open(io.BytesIO(png(ramp16))).mode.startswith("I;16")
    assert (wide.int() - narrow.int()).abs().max().item() == 0
    assert abs(wide.float().mean().item() - 127.5) < 2  # not the near-white of PIL's own conversion


def test_a_small_shard_is_judged_when_it_ends(tmp_path, tokenizer):
    from flamingo_dist.data.pipeline import Source, Stream
    from flamingo_dist.data.processing import Processor

    samples = [{"__key__": f"p{i}", "jpg": shardkit.image_bytes(i), "txt": "a shape ."} for i in range(2)]
    samples += [{"__key__": f"bad{i}", "txt": "no image ."} for i in range(2)]
    small = shardkit.write_tar(str(tmp_path / "pairs-00000.tar"), samples)
    proc = Processor(tokenizer, seq_len=64, max_images=2, image_size=32)
    stream = Stream(Source("s", "pairs", [small], micro_batch_size=1), proc, 0, 1, seed=0, max_skip_rate=0.2,
                    skip_rate_min_samples=100)
    for _ in range(3):  # the third batch reads past the shard's end
        stream.next_batch()
    assert stream.error and "2 of all 4 samples of shard" in stream.error and small in stream.error


def test_a_stream_state_saved_before_the_new_counters_resumes(tmp_path, tokenizer):
    """Checkpoints written before bad_field and images_dropped/<reason> existed still resume."""
    from flamingo_dist.data.pipeline import COUNTERS, Source, Stream, initial_state
    from flamingo_dist.data.processing import Processor

    shard = shardkit.write_tar(str(tmp_path / "pairs-00000.tar"),
                               [{"__key__": f"p{i}", "jpg": shardkit.image_bytes(i), "txt": "a shape ."} for i in range(3)])
    old = initial_state()
    old["counts"] = {c: 0 for c in COUNTERS if c != "skipped/bad_field" and not c.startswith("images_dropped/")}
    stream = Stream(Source("s", "pairs", [shard]), Processor(tokenizer, seq_len=64, max_images=2, image_size=32),
                    0, 1, seed=0, state=old)
    _, state = stream.next_batch()
    assert set(state["counts"]) == set(COUNTERS) and state["counts"]["documents"] >= 1


# ------------------------------------------------------------------------------------ fuzzing
JUNK = [None, True, False, 0, -1, 10 ** 12, 1.5, float("inf"), "", "high", "!!!", [], [None], {}, {"a": 1}]


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, path + (i,))


def _mutate_json(raw, rng: random.Random):
    try:
        meta = json.loads(raw)
    except ValueError:
        return raw
    path = rng.choice(list(_nodes(meta))[1:] or [()])
    if not path:
        return json.dumps(rng.choice(JUNK))
    parent = meta
    for p in path[:-1]:
        parent = parent[p]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(JUNK)
    return json.dumps(meta)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(4)
    if op == 0 or not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if op == 1:
        return data[: rng.randrange(len(data))]
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf) if op == 2 else bytes(buf[: len(buf) // 2]) + data[len(buf) // 2:]


def mutate(sample: dict, rng: random.Random) -> dict:
    out = dict(sample)
    for _ in range(rng.randint(1, 3)):
        members = [k for k in out if k != "__key__"]
        if not members:
            break
        name = rng.choice(members)
        op = rng.randrange(10)
        if name == "json" and op < 6:
            out[name] = _mutate_json(out[name], rng)
        elif op < 7:
            value = out[name].encode() if isinstance(out[name], str) else out[name]
            out[name] = _mutate_bytes(value, rng)
        elif op < 9:
            del out[name]
        else:
            out[name.replace(".", "_") + rng.choice([".jpg", ".txt", ".json", ".frame001.png", ".gif"])] = out.pop(name)
    return out


@pytest.mark.parametrize("fmt", ["pairs", "obelics", "mmc4", "video"])
def test_random_mutations_of_real_samples_never_raise_and_counts_add_up(fmt, tmp_path, tokenizer):
    """Every sample of the format's shard set, mutated 8 ways (JSON fields replaced by junk or
    deleted, member bytes cut, flipped or random, members deleted or renamed), plus a copy of a
    shard with flipped bytes in its tar headers: one pass as training reads it and the checker
    both finish, every sample is a document or skipped under a reason, every dropped image is
    counted under one, and the unmutated samples all come through."""
    from flamingo_dist.data.formats import REASONS, read_shard
    from flamingo_dist.data.processing import Limits
    from flamingo_dist.data.shards import check_shards

    os.makedirs(tmp_path / "orig")
    shards, good, _ = {"pairs": shardkit.pairs_set, "obelics": shardkit.obelics_set, "mmc4": shardkit.mmc4_set,
                       "video": shardkit.video_set}[fmt](str(tmp_path / "orig"))
    rng = random.Random(fmt)
    originals = [s for path in shards for _, s in read_shard(path) if isinstance(s, dict)]
    mutated = [{**mutate(s, rng), "__key__": f"m{j}_{s['__key__']}"} for j in range(8) for s in originals]
    os.makedirs(tmp_path / "fuzz")
    fuzz = [shardkit.write_tar(str(tmp_path / "fuzz" / f"f-{i:05d}.tar"), mutated[i::3]) for i in range(3)]
    headers = bytearray(open(shards[0], "rb").read())
    for _ in range(6):
        block = rng.randrange(len(headers) // 512) * 512
        headers[block + rng.randrange(512)] = rng.randrange(256)
    flipped = str(tmp_path / "fuzz" / "f-00003.tar")
    with open(flipped, "wb") as f:
        f.write(bytes(headers))
    paths = shards + fuzz + [flipped]

    keys, counts = shardkit.one_pass(fmt, paths, tokenizer, max_image_pixels=shardkit.HUGE ** 2 - 1)
    skipped = sum(counts[f"skipped/{r}"] for r in REASONS)
    assert counts["samples"] == counts["documents"] + skipped and counts["documents"] == len(keys)
    assert counts["images_dropped"] == sum(counts[f"images_dropped/{r}"] for r in REASONS)
    assert skipped > 0 and counts["documents"] > good  # the mutations did both
    original_keys = {s["__key__"] for s in originals}
    assert len([k for k in keys if k in original_keys]) >= good  # none of the good originals lost
    rep = check_shards(paths, fmt, image_size=32, frames=4, limits=Limits(max_image_pixels=shardkit.HUGE ** 2 - 1))
    assert rep.samples == rep.good + sum(rep.skipped.values())
    assert (rep.good, sum(rep.skipped.values())) == (counts["documents"], skipped)
