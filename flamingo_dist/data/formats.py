"""Reading webdataset shards as users have them, and turning each sample into a document.

A shard is a tar; consecutive members sharing a key (the member path up to the first dot of its
file name) form one sample, as webdataset writes them. `read_shard` walks the members itself (not
through webdataset's pipeline, whose errors end the whole shard silently or raise) so that a
truncated or damaged tar yields every sample before the damage and then one `BadSample`.

A document is a list of items: text (str) or a `Media` (the encoded bytes of one image, or of
the frames of one video). The four formats:

- ``obelics``: ``key.json`` = {"texts": [str|null, ...], "images": [member|null, ...]} (parallel
  lists; an image entry names a member ``key.<member>`` holding the image bytes). Also the
  synthetic debug corpus.
- ``mmc4``: ``key.json`` = an MMC4 document: {"text_list": [...], "image_info": [{"image_name",
  "matched_text_index", "matched_sim", optional "image_base64"}]}; the image is inline
  (``image_base64``) or a member ``key.<image_name>``. Images whose similarity is below the
  threshold are dropped; the others go before, or with probability `image_after_text_p` after,
  the sentence they matched (the paper's placement augmentation).
- ``pairs``: img2dataset output: ``key.jpg|jpeg|png|webp`` + ``key.txt`` (caption) + optional
  ``key.json`` (metadata; must parse when present).
- ``video``: frames as members ``key.frame<NNN>.<ext>`` (in order of NNN), or one animated
  container ``key.gif|webp``; caption in ``key.txt`` or ``key.json`` {"caption"}.

Every problem is a `BadSample` with one of `REASONS`, so it can be counted and the sample skipped.
A problem with one image of a document (a missing member, bad base64, a malformed MMC4
`image_info` entry) drops only that image: the document keeps the others and lists the dropped
one's BadSample in `Document.dropped`; a document left with no image is bad, under the reason of
its first dropped image. A field of the wrong type (``"matched_sim": null``, a number where text
belongs) is `bad_field`.
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Union

from flamingo_dist.config.schema import DATA_FORMATS

FORMATS = DATA_FORMATS
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REASONS = ("truncated_tar", "malformed_json", "missing_key", "bad_field", "undecodable_image", "image_too_large",
           "no_image", "no_text")
_FRAME = re.compile(r"^frame(\d+)\.(jpg|jpeg|png|webp)$")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Media:
    """One image (one encoded frame) or one video (several)."""

    frames: list[bytes]
    video: bool = False
    name: str = ""


Item = Union[str, Media]


@dataclass
class Document:
    items: list[Item]
    key: str = ""
    dropped: list[BadSample] = field(default_factory=list)  # images left out while parsing, one each


# --------------------------------------------------------------------------- tar reading
class _Damage(Exception):
    pass


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _Damage(f"corrupt number field {bytes(field)!r} in a header") from None


def _tar_members(f) -> Iterator[tuple[str, int, int]]:
    """(name, size, data offset) of every regular file of an open tar, reading only the 512-byte
    headers (about 5x faster than `tarfile` for webdataset's many small members). Handles
    ustar prefixes, GNU long names and pax `path` records; raises _Damage on a cut or corrupt
    archive."""
    long_name = None
    while True:
        header = f.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise _Damage("cut inside a header" if header else "no end-of-archive marker (cut short)")
        if header.count(0) == tarfile.BLOCKSIZE:
            return
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise _Damage(f"bad header checksum at byte {f.tell() - tarfile.BLOCKSIZE}")
        size, kind = _octal(header[124:136]), header[156:157]
        start = f.tell()
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if kind in (b"L", b"x"):
            data = f.read(size)
            if len(data) < size:
                raise _Damage("cut inside an extended header")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0]
            else:
                for record in data.split(b"\n"):
                    _, _, kv = record.partition(b" ")
                    if kv.startswith(b"path="):
                        long_name = kv[5:]
        elif kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name, long_name = long_name, None
            yield name.decode("utf-8", "surrogateescape"), size, start
        f.seek(start + (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE)


def read_shard(path: str, skip: int = 0) -> Iterator[tuple[int, Union[dict, BadSample]]]:
    """(index in shard, sample dict {"__key__", suffix: bytes}) for every sample from `skip` on;
    a damaged tar (a member cut short, a partial or corrupt header, or no end-of-archive blocks)
    ends with one (index, BadSample("truncated_tar")) in place of the sample it damaged. Samples
    before `skip` are not read (their members are seeked over)."""
    index, current, key = 0, {}, None
    damage = None
    with open(path, "rb") as f:
        try:
            for name, size, start in _tar_members(f):
                base = os.path.basename(name)
                stem, dot, suffix = base.partition(".")
                if not dot:
                    continue
                k = os.path.join(os.path.dirname(name), stem)
                if k != key:
                    if key is not None:
                        if index >= skip:
                            yield index, current
                        index += 1
                    key, current = k, {"__key__": k}
                if index >= skip:
                    f.seek(start)
                    data = f.read(size)
                    if len(data) < size:
                        raise _Damage(f"member {name} cut short")
                    current[suffix.lower()] = data
        except _Damage as e:
            damage = str(e)
    if damage is not None:
        if index >= skip:
            yield index, BadSample("truncated_tar", f"{os.path.basename(path)} at sample {index}: {damage}")
        return
    if key is not None and index >= skip:
        yield index, current


def list_shards(spec: str, what: str = "data.shards") -> list[str]:
    """A directory of .tar files, a glob, or webdataset brace notation -> sorted shard paths.
    An explicitly named shard that does not exist, a pattern matching none, or an empty shard
    file is an error (FileNotFoundError naming `what`)."""
    import braceexpand

    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        paths = []
        for pat in braceexpand.braceexpand(spec):
            found = sorted(glob.glob(pat))
            if not found and not glob.has_magic(pat):
                raise FileNotFoundError(f"{what}: shard {pat} does not exist (from {spec!r})")
            paths.extend(found)
    if not paths:
        raise FileNotFoundError(f"{what}: no .tar shards match {spec!r}")
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty:
        raise FileNotFoundError(f"{what}: empty shard file(s) {', '.join(empty[:3])}")
    return paths


# --------------------------------------------------------------------------- parsing
def _json(sample: dict, name: str = "json") -> dict:
    if name not in sample:
        raise BadSample("missing_key", f"{sample['__key__']}: no .{name}")
    try:
        value = json.loads(sample[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("malformed_json", f"{sample['__key__']}.{name}: {e}") from None
    if not isinstance(value, dict):
        raise BadSample("malformed_json", f"{sample['__key__']}.{name}: not a JSON object")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadSample("bad_field", f"{where}: expected text, got {type(value).__name__}")
    return value


def _list(meta: dict, name: str, key: str) -> list:
    if name not in meta:
        raise BadSample("missing_key", f"{key}.json: no list {name!r}")
    value = meta[name]
    if not isinstance(value, list):
        raise BadSample("bad_field", f"{key}.json: {name!r} is {type(value).__name__}, not a list")
    return value


def _check_document(doc: Document) -> Document:
    merged: list[Item] = []  # adjacent texts become one, joined by a space (the layout strips each text's ends)
    for item in doc.items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1].rstrip(" ") + " " + item.lstrip(" ")
        else:
            merged.append(item)
    doc.items = merged
    if not any(isinstance(it, Media) for it in doc.items):
        raise doc.dropped[0] if doc.dropped else BadSample("no_image", doc.key)
    if not any(isinstance(it, str) and it.strip() for it in doc.items):
        raise BadSample("no_text", doc.key)
    return doc


def parse_obelics(sample: dict) -> Document:
    meta, key = _json(sample), sample["__key__"]
    texts, images = _list(meta, "texts", key), _list(meta, "images", key)
    if len(texts) != len(images):
        raise BadSample("malformed_json", f"{key}.json: 'texts' ({len(texts)}) and 'images' ({len(images)}) differ")
    doc = Document([], key)
    for i, (text, image) in enumerate(zip(texts, images)):
        if image is not None:
            member = image.lower() if isinstance(image, str) else None
            if member is None:
                doc.dropped.append(BadSample("bad_field", f"{key}.json images[{i}]: {type(image).__name__}, "
                                                          "not a member name"))
            elif member not in sample:
                doc.dropped.append(BadSample("missing_key", f"{key}: image member .{member} not in the shard"))
            else:
                doc.items.append(Media([sample[member]], name=member))
        elif text is not None and _text(text, f"{key}.json texts[{i}]"):
            doc.items.append(text)
    return _check_document(doc)


def _mmc4_image(sample: dict, info, i: int, num_sentences: int, min_sim: float) -> tuple[int, Media] | None:
    """(sentence index, image) of one `image_info` entry; None when its similarity is under
    `min_sim`; BadSample when the entry cannot be used."""
    key = sample["__key__"]
    where = f"{key}.json image_info[{i}]"
    if not isinstance(info, dict):
        raise BadSample("bad_field", f"{where}: {type(info).__name__}, not an object")
    sim = info.get("matched_sim", 1.0)
    if isinstance(sim, bool) or not isinstance(sim, (int, float)) or math.isnan(sim):
        raise BadSample("bad_field", f"{where}: matched_sim {sim!r} is not a number")
    if sim < min_sim:
        return None
    if "matched_text_index" not in info:
        raise BadSample("missing_key", f"{where}: no matched_text_index")
    index = info["matched_text_index"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_sentences:
        raise BadSample("bad_field", f"{where}: matched_text_index {index!r} is not a sentence index "
                                     f"(0..{num_sentences - 1})")
    name = info.get("image_name", f"image{i}")
    if not isinstance(name, str):
        raise BadSample("bad_field", f"{where}: image_name {name!r} is not text")
    inline = info.get("image_base64")
    if inline:
        if not isinstance(inline, str):
            raise BadSample("bad_field", f"{where}: image_base64 is {type(inline).__name__}, not text")
        try:
            data = base64.b64decode(inline, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadSample("undecodable_image", f"{key}: image_base64 of {name}: {e}") from None
    else:
        if name.lower() not in sample:
            raise BadSample("missing_key", f"{key}: image {name} neither inline (image_base64) nor a member")
        data = sample[name.lower()]
    return index, Media([data], name=name)


def parse_mmc4(sample: dict, min_sim: float, image_after_text_p: float, rng: random.Random) -> Document:
    meta, key = _json(sample), sample["__key__"]
    sentences, infos = _list(meta, "text_list", key), _list(meta, "image_info", key)
    doc = Document([], key)
    before: dict[int, list[Media]] = {}
    after: dict[int, list[Media]] = {}
    for i, info in enumerate(infos):
        try:
            placed = _mmc4_image(sample, info, i, len(sentences), min_sim)
        except BadSample as e:
            doc.dropped.append(e)
            continue
        if placed is not None:
            side = after if rng.random() < image_after_text_p else before
            side.setdefault(placed[0], []).append(placed[1])
    for i, sentence in enumerate(sentences):
        doc.items.extend(before.get(i, []))
        doc.items.append(_text(sentence, f"{key}.json text_list[{i}]"))
        doc.items.extend(after.get(i, []))
    return _check_document(doc)


def parse_pair(sample: dict) -> Document:
    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_key", f"{key}: no image member (.{'/.'.join(IMAGE_EXTS)})")
    if "txt" not in sample:
        raise BadSample("missing_key", f"{key}: no .txt caption")
    if "json" in sample:
        _json(sample)  # metadata only, but it must parse
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("no_text", f"{key}.txt: {e}") from None
    return _check_document(Document([Media([sample[ext]], name=ext), caption], key))


def parse_video(sample: dict) -> Document:
    key = sample["__key__"]
    frames = sorted((int(m.group(1)), name) for name in sample if (m := _FRAME.match(name)))
    if frames:
        media = Media([sample[name] for _, name in frames], video=True)
    else:
        container = next((e for e in ("gif", "webp") if e in sample), None)
        if container is None:
            raise BadSample("missing_key", f"{key}: no frame<NNN>.<ext> members and no .gif/.webp container")
        media = Media([sample[container]], video=True, name=container)
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        meta = _json(sample)
        if "caption" not in meta:
            raise BadSample("missing_key", f"{key}.json: no caption")
        caption = _text(meta["caption"], f"{key}.json caption")
    else:
        raise BadSample("missing_key", f"{key}: no .txt or .json caption")
    return _check_document(Document([media, caption], key))


def parse(fmt: str, sample: dict, rng: random.Random, min_sim: float = 0.0,
          image_after_text_p: float = 0.0) -> Document:
    """The document of one raw sample in format `fmt`, or BadSample."""
    if fmt == "obelics":
        return parse_obelics(sample)
    if fmt == "mmc4":
        return parse_mmc4(sample, min_sim, image_after_text_p, rng)
    if fmt == "pairs":
        return parse_pair(sample)
    if fmt == "video":
        return parse_video(sample)
    raise ValueError(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
