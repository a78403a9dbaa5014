"""Every shard format, with bad samples of every kind: the exact good samples come out (none
lost), each bad one is counted under its reason, both in training's stream and in the checker."""

import os
import subprocess
import sys

import pytest
import shardkit
from conftest import REPO

SETS = {"pairs": shardkit.pairs_set, "obelics": shardkit.obelics_set, "mmc4": shardkit.mmc4_set,
        "video": shardkit.video_set}


@pytest.mark.parametrize("fmt", list(SETS))
def test_good_samples_come_out_and_bad_ones_are_counted_per_reason(fmt, tmp_path, tokenizer):
    from flamingo_dist.data.formats import REASONS
    from flamingo_dist.data.shards import check_shards

    shards, good, reasons = SETS[fmt](str(tmp_path))
    limit = shardkit.HUGE ** 2 - 1
    keys, counts = shardkit.one_pass(fmt, shards, tokenizer, max_image_pixels=limit)
    assert len(keys) == len(set(keys)) == good, keys
    assert all(not k.startswith(("bad", "vid_no", "vid_bad")) for k in keys)
    assert counts["documents"] == good
    assert {r: counts[f"skipped/{r}"] for r in REASONS if counts[f"skipped/{r}"]} == reasons
    assert counts["samples"] == good + sum(reasons.values())  # none lost: every sample is good or counted
    from flamingo_dist.data.processing import Limits

    rep = check_shards(shards, fmt, image_size=32, frames=4, limits=Limits(max_image_pixels=limit))
    assert (rep.good, dict(rep.skipped)) == (good, reasons)


def test_damaged_image_in_a_document_drops_only_that_image(tmp_path, tokenizer):
    shards, _, _ = shardkit.obelics_set(str(tmp_path))
    _, counts = shardkit.one_pass("obelics", shards, tokenizer)
    assert counts["images_dropped"] == 1  # doc9's c.jpg


def test_mmc4_images_go_with_their_sentence_before_or_after_it(tmp_path, tokenizer):
    import random

    from flamingo_dist.data.formats import Media, parse

    sample = shardkit.mmc4_doc(0, sims=(0.3, 0.3, 0.1), inline=(True, False, True))
    orders = set()
    for seed in range(40):
        doc = parse("mmc4", {**sample}, random.Random(seed), min_sim=0.24, image_after_text_p=0.5)
        layout = []  # "I" per image, then each sentence (adjacent sentences share one text item)
        for it in doc.items:
            if isinstance(it, Media):
                layout.append("I")
                continue
            rest = it.strip()
            for sentence in ("first sentence .", "second sentence .", "third ."):
                if rest.startswith(sentence):
                    layout.append(sentence)
                    rest = rest[len(sentence):].strip()
            assert rest == "", it
        layout = tuple(layout)
        orders.add(layout)
        assert layout.count("I") == 2  # the third image is under the threshold
        s0, s1 = layout.index("first sentence ."), layout.index("second sentence .")
        i0, i1 = [k for k, v in enumerate(layout) if v == "I"]
        assert i0 in (s0 - 1, s0 + 1) and i1 in (s1 - 1, s1 + 1)  # next to the sentence it matched
    assert len(orders) == 4  # before/after independently for each image
    never = parse("mmc4", {**sample}, random.Random(0), min_sim=0.24, image_after_text_p=0.0)
    assert isinstance(never.items[0], Media)
    always = parse("mmc4", {**sample}, random.Random(0), min_sim=0.24, image_after_text_p=1.0)
    assert always.items[0] == "first sentence ." and always.items[2] == "second sentence ."
    assert always.items[4] == "third ."  # sentences stay whole; adjacent ones are joined by a space
    never_text = [it for it in never.items if isinstance(it, str)]
    assert never_text[-1] == "second sentence . third ."


def test_video_frames_are_spread_over_the_clip(tmp_path):
    import torch

    from flamingo_dist.data.formats import Media
    from flamingo_dist.data.processing import MediaDecoder

    decode = MediaDecoder(32, frames=4)
    frames = [shardkit.image_bytes(i, "PNG") for i in range(7)]
    clip = decode(Media(frames, video=True))
    assert clip.shape == (4, 3, 32, 32)
    single = MediaDecoder(32)
    for got, pick in zip(clip, [0, 2, 4, 6]):
        assert torch.equal(got, single(Media([frames[pick]])))
    assert decode(Media([shardkit.gif_bytes(3)], video=True, name="gif")).shape == (4, 3, 32, 32)


def test_missing_or_empty_shard_lists_fail_naming_them(tmp_path):
    from flamingo_dist.data.formats import list_shards

    with pytest.raises(FileNotFoundError, match="data.shards: no .tar shards"):
        list_shards(str(tmp_path / "nothing-*.tar"))
    shardkit.write_tar(str(tmp_path / "s-00000.tar"), [{"__key__": "a", "txt": "x"}])
    with pytest.raises(FileNotFoundError, match=r"s-00001.tar does not exist"):
        list_shards(str(tmp_path / "s-{00000..00001}.tar"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"data.sources\[x\].shards: no .tar shards"):
        list_shards(str(tmp_path / "empty"), "data.sources[x].shards")
    (tmp_path / "empty" / "z-00000.tar").write_bytes(b"")  # a zero-byte shard (a copy that never finished)
    with pytest.raises(FileNotFoundError, match=r"data.val_shards: empty shard file\(s\) .*z-00000.tar"):
        list_shards(str(tmp_path / "empty"), "data.val_shards")


def test_tools_build_pairs_mmc4_video_and_check_them(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        (imgs / f"{i}.jpg").write_bytes(shardkit.image_bytes(i))
    (tmp_path / "caps.csv").write_text("image,caption\n" + "".join(f"{i}.jpg,caption {i}\n" for i in range(5))
                                       + "missing.jpg,gone\n")
    tool = [sys.executable, os.path.join(REPO, "tools", "build_shards.py")]
    check = [sys.executable, os.path.join(REPO, "tools", "check_shards.py")]
    r = subprocess.run(tool + ["pairs", "--images", str(imgs), "--captions", str(tmp_path / "caps.csv"),
                               "--out", str(tmp_path / "pairs"), "--per-shard", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and "missing.jpg not found" in r.stderr, r.stderr  # left out, and said
    assert "wrote 5 samples in 3 shards" in r.stdout
    r = subprocess.run(check + ["--format", "pairs", str(tmp_path / "pairs")], capture_output=True, text=True)
    assert r.returncode == 0 and "3 shards, 5 samples: 5 usable" in r.stdout, r.stdout + r.stderr
    # mmc4 JSONL + images
    import json

    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text_list": ["one .", "two ."], "image_info": [
                {"image_name": f"{i}.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}) + "\n")
    r = subprocess.run(tool + ["mmc4", "--docs", str(tmp_path / "docs.jsonl"), "--images", str(imgs),
                               "--out", str(tmp_path / "mmc4"), "--inline"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(check + ["--format", "mmc4", str(tmp_path / "mmc4")], capture_output=True, text=True)
    assert "3 usable" in r.stdout, r.stdout
    # frame folders + captions JSONL
    for v in range(2):
        d = tmp_path / "clips" / f"v{v}"
        d.mkdir(parents=True)
        for k in range(3):
            (d / f"{k:04d}.jpg").write_bytes(shardkit.image_bytes(10 * v + k))
    (tmp_path / "vcaps.jsonl").write_text("".join(json.dumps({"video": f"v{v}", "caption": "a clip ."}) + "\n"
                                                  for v in range(2)))
    r = subprocess.run(tool + ["video", "--frames", str(tmp_path / "clips"), "--captions", str(tmp_path / "vcaps.jsonl"),
                               "--out", str(tmp_path / "video")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # a bad sample is reported with its reason and the exit status says so
    shardkit.write_tar(str(tmp_path / "video" / "video-00001.tar"), [{"__key__": "x", "txt": "no frames ."}])
    report = tmp_path / "report.json"
    r = subprocess.run(check + ["--format", "video", str(tmp_path / "video"), "--json", str(report)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "2 usable" in r.stdout and "missing_key: 1" in r.stdout, r.stdout
    assert json.loads(report.read_text())["skipped"] == {"missing_key": 1}


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_shard_reader_reads_what_tarfile_reads(tmp_path, fmt):
    """Our header-only tar reader against Python's tarfile: long names, folders, pax records."""
    import io
    import tarfile

    from flamingo_dist.data.formats import read_shard

    path = str(tmp_path / "x.tar")
    form = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    long_dir = "d" * (60 if fmt == "ustar" else 130)
    members = [(f"{long_dir}/k{i}.{ext}", bytes([i]) * (100 * i + 7)) for i in range(5) for ext in ("jpg", "txt")]
    members.append(("plain/kx.json", b"{}"))
    with tarfile.open(path, "w", format=form) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == "pax":
                info.pax_headers = {"comment": "ünïcode"}
            tar.addfile(info, io.BytesIO(data))
    got = [s for _, s in read_shard(path)]
    want = {}
    for name, data in members:
        stem, _, ext = name.partition(".")
        want.setdefault(stem, {"__key__": stem})[ext] = data
    assert got == list(want.values())
    assert [s["__key__"] for _, s in read_shard(path, skip=3)] == list(want)[3:]


def test_pixels_equal_a_contiguous_resize(tmp_path):
    """The loader's no-copy resize of the HWC array gives the bytes of torchvision's documented
    path (pil_to_tensor, then resize), which the IDEFICS image processor follows."""
    import io

    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as F
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from flamingo_dist.data.processing import square_uint8

    rng = np.random.default_rng(0)
    for h, w in [(57, 83), (300, 200), (224, 224), (31, 500)]:
        img = Image.open(io.BytesIO(shardkit.image_bytes(h * w, side=max(h, w)))).resize((w, h))
        img = Image.fromarray(np.clip(np.asarray(img).astype(int) + rng.integers(-9, 9, (h, w, 3)), 0, 255)
                              .astype(np.uint8))
        ref = F.resize(F.pil_to_tensor(img), [64, 64], interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(square_uint8(img, 64), ref)
