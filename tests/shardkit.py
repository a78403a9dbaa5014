"""Small shard sets of every format, each with bad samples of every kind it can have, and the
exact numbers of good samples and of bad ones per reason that a reader must report."""

import base64
import io
import json
import os
import random
import tarfile

from flamingo_dist.data.synthetic import draw_shape

CAPTIONS = ["a small red circle .", "a large blue square .", "the image shows a green triangle .",
            "we see a yellow circle on a black background ."]


def image_bytes(seed: int, fmt: str = "JPEG", side: int = 48) -> bytes:
    rng = random.Random(seed)
    img = draw_shape(rng.choice(["red", "blue", "green"]), rng.choice(["circle", "square"]), "large", side, rng)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gif_bytes(frames: int, seed: int = 0) -> bytes:
    from PIL import Image

    imgs = [Image.open(io.BytesIO(image_bytes(seed + i, "PNG"))).convert("RGB") for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=100)
    return buf.getvalue()


def write_tar(path: str, samples: list[dict]) -> str:
    """Samples {"__key__", suffix: bytes|str} -> a tar, members in order (as webdataset writes)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for suffix, value in s.items():
                if suffix == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def cut_tar(path: str, samples: list[dict], whole: int) -> str:
    """A tar of `samples` cut in the middle of sample number `whole`'s first member: the first
    `whole` samples are complete."""
    write_tar(path, samples)
    with tarfile.open(path) as tar:
        first = [m for m in tar.getmembers() if m.name.startswith(samples[whole]["__key__"] + ".")][0]
        cut = first.offset_data + first.size // 2
    with open(path, "r+b") as f:
        f.truncate(cut)
    return path


HUGE = 400  # side of the "too large" image; tests set data.max_image_pixels below HUGE**2


def pairs_set(out: str) -> tuple[list[str], int, dict]:
    """(shards, good samples, {reason: count}) of img2dataset-style pairs."""
    good = [{"__key__": f"good{i}", "jpg": image_bytes(i), "txt": CAPTIONS[i % 4], "json": json.dumps({"i": i})}
            for i in range(6)]
    bad = [
        {"__key__": "bad_decode", "jpg": b"\xff\xd8 not really a jpeg", "txt": "a cat ."},
        {"__key__": "bad_nocaption", "jpg": image_bytes(50)},
        {"__key__": "bad_noimage", "txt": "a caption without its image ."},
        {"__key__": "bad_json", "jpg": image_bytes(51), "txt": "a dog .", "json": "{not json"},
        {"__key__": "bad_huge", "jpg": image_bytes(52, side=HUGE), "txt": "a big one ."},
        {"__key__": "bad_empty", "png": image_bytes(53, "PNG"), "txt": "   "},
    ]
    a = write_tar(os.path.join(out, "pairs-00000.tar"), good[:3] + bad[:3])
    b = write_tar(os.path.join(out, "pairs-00001.tar"), good[3:] + bad[3:])
    # a third shard cut short: its first whole samples are good, the damage is counted once
    c = cut_tar(os.path.join(out, "pairs-00002.tar"),
                [{"__key__": f"t{i}", "jpg": image_bytes(60 + i), "txt": "x ."} for i in range(4)], whole=2)
    return [a, b, c], 6 + 2, {"undecodable_image": 1, "missing_key": 2, "malformed_json": 1,
                                      "image_too_large": 1, "no_text": 1, "truncated_tar": 1}


def obelics_set(out: str) -> tuple[list[str], int, dict]:
    def doc(i, texts, images, members):
        s = {"__key__": f"doc{i}", "json": json.dumps({"texts": texts, "images": images})}
        s.update(members)
        return s

    good = [doc(i, ["intro .", None, "a shape .", None, "end ."], [None, "a.png", None, "b.jpg", None],
                {"a.png": image_bytes(i, "PNG"), "b.jpg": image_bytes(100 + i)}) for i in range(5)]
    # one image of a good document is undecodable: the image is dropped, the document kept
    good.append(doc(9, ["x .", None, "y ."], [None, "a.jpg", None], {"a.jpg": image_bytes(9)}))
    good[-1]["json"] = json.dumps({"texts": ["x .", None, None, "y ."], "images": [None, "a.jpg", "c.jpg", None]})
    good[-1]["c.jpg"] = b"garbage"
    bad = [
        doc(20, ["x .", None], [None, "gone.png"], {}),  # missing_key
        doc(21, ["x .", None], [None], {}),  # malformed_json (lists differ)
        doc(22, ["only text ."], [None], {}),  # no_image
        doc(23, [None, None], ["a.png", "b.png"], {"a.png": image_bytes(1, "PNG"), "b.png": image_bytes(2, "PNG")}),
        {"__key__": "doc24", "json": b"\x80\x81 not utf8"},  # malformed_json
        doc(25, ["x .", None], [None, "a.jpg"], {"a.jpg": b"garbage"}),  # its only image is bad
    ]
    a = write_tar(os.path.join(out, "obelics-00000.tar"), good[:3] + bad[:3])
    b = write_tar(os.path.join(out, "obelics-00001.tar"), good[3:] + bad[3:])
    return [a, b], 6, {"missing_key": 1, "malformed_json": 2, "no_image": 1, "no_text": 1, "undecodable_image": 1}


def mmc4_doc(i: int, sims=(0.3, 0.3), inline=(True, False), bad_b64=False) -> dict:
    info, sample = [], {"__key__": f"mmc4_{i}"}
    for j, (sim, inl) in enumerate(zip(sims, inline)):
        name = f"img{j}.jpg"
        entry = {"image_name": name, "matched_text_index": j, "matched_sim": sim, "raw_url": f"http://x/{i}/{j}"}
        data = image_bytes(1000 + 10 * i + j)
        if inl:
            entry["image_base64"] = "!!!notbase64" if bad_b64 else base64.b64encode(data).decode()
        else:
            sample[name] = data
        info.append(entry)
    sample["json"] = json.dumps({"text_list": ["first sentence .", "second sentence .", "third ."],
                                 "image_info": info, "url": f"http://x/{i}"})
    return sample


def mmc4_set(out: str) -> tuple[list[str], int, dict]:
    """A bad field of one image entry drops only that image (the documents with the other image
    count as good); a document whose every image is bad is counted under the first one's reason."""
    good = [mmc4_doc(i) for i in range(5)] + [mmc4_doc(5, sims=(0.1, 0.5))]  # one image under the threshold
    nomatch = mmc4_doc(6, sims=(0.1, 0.2))  # no_image: nothing above the threshold
    b64 = mmc4_doc(7, bad_b64=True)  # image 0 dropped (undecodable_image), image 1 kept: good
    nomember = mmc4_doc(8)
    del nomember["img1.jpg"]  # image 1 dropped (missing_key): good
    noindex = mmc4_doc(9)
    meta = json.loads(noindex["json"])
    del meta["image_info"][0]["matched_text_index"]
    noindex["json"] = json.dumps(meta)  # image 0 dropped (missing_key): good
    broken = {"__key__": "mmc4_10", "json": "{\"text_list\": ["}  # malformed_json
    all_b64 = mmc4_doc(11, inline=(True, True), bad_b64=True)  # undecodable_image: both images bad
    no_sim = mmc4_doc(12)
    meta = json.loads(no_sim["json"])
    for info in meta["image_info"]:
        info["matched_sim"] = None
    no_sim["json"] = json.dumps(meta)  # bad_field: no image has a usable similarity
    a = write_tar(os.path.join(out, "mmc4-00000.tar"), good[:3] + [nomatch, b64, all_b64])
    b = write_tar(os.path.join(out, "mmc4-00001.tar"), good[3:] + [nomember, noindex, broken, no_sim])
    return [a, b], 9, {"no_image": 1, "undecodable_image": 1, "malformed_json": 1, "bad_field": 1}


def video_set(out: str) -> tuple[list[str], int, dict]:
    def frames(i, n):
        return {f"frame{k:03d}.jpg": image_bytes(2000 + 10 * i + k) for k in range(n)}

    good = [{"__key__": f"vid{i}", "txt": CAPTIONS[i % 4], **frames(i, 3 + i % 3)} for i in range(4)]
    good.append({"__key__": "vid_gif", "gif": gif_bytes(5), "json": json.dumps({"caption": "a moving shape ."})})
    bad = [
        {"__key__": "vid_nocap", **frames(7, 3)},  # missing_key
        {"__key__": "vid_badframe", "txt": "x .", "frame000.jpg": b"garbage", "frame001.jpg": image_bytes(3)},
        {"__key__": "vid_noframes", "txt": "nothing to see ."},  # missing_key
    ]
    a = write_tar(os.path.join(out, "video-00000.tar"), good[:3] + bad[:1])
    b = write_tar(os.path.join(out, "video-00001.tar"), good[3:] + bad[1:])
    return [a, b], 5, {"missing_key": 2, "undecodable_image": 1}


def one_pass(fmt, shards, tokenizer, **limits):
    """The documents (keys) and the counters of one whole pass of a one-stream source, read as
    training reads it."""
    from flamingo_dist.data.pipeline import Source, Stream
    from flamingo_dist.data.processing import Limits, Processor

    proc = Processor(tokenizer, seq_len=256, max_images=5, image_size=32, frames=4 if fmt == "video" else 0,
                     limits=Limits(**limits))
    stream = Stream(Source("s", fmt, shards, min_sim=0.24, image_after_text_p=0.5), proc, 0, 1, seed=0)
    keys = []
    for _, enc in stream._docs:
        if stream.pass_counts:
            return keys, stream.pass_counts[0]
        keys.append(enc.key)
