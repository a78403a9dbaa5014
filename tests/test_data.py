"""Token layout, labels and image attention mask against transformers' IdeficsProcessor."""

import json
import random

import pytest
import torch


def idefics_processor(tokenizer):
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    return IdeficsProcessor(IdeficsImageProcessor(image_size=32), tokenizer)


def first_samples(corpus: str, n: int):
    import webdataset as wds

    from flamingo_dist.data.formats import list_shards

    out = []
    for s in wds.tarfile_samples([{"url": p} for p in list_shards(corpus)]):
        out.append(s)
        if len(out) == n:
            return out
    return out


def test_pipeline_layout_and_mask_equal_idefics_processor(synthetic_corpus, tokenizer):
    from PIL import Image

    from flamingo_dist.data.formats import parse_obelics
    from flamingo_dist.data.processing import Processor

    proc = Processor(tokenizer, seq_len=128, max_images=3, image_size=32)
    processor = idefics_processor(tokenizer)
    checked = 0
    for sample in first_samples(synthetic_corpus, 12):
        ours = proc.sequence([proc.encode(parse_obelics(sample))])
        meta = json.loads(sample["json"])
        prompt = [Image.new("RGB", (32, 32)) if img else text for text, img in zip(meta["texts"], meta["images"])]
        ref = processor(text=[prompt], add_eos_token=True, return_tensors="pt")
        n = int(ours["attention_mask"].sum())
        assert n < 128, "test documents must fit unpadded"
        assert torch.equal(ours["input_ids"][:n], ref["input_ids"][0])
        n_img = ref["image_attention_mask"].shape[-1]
        assert torch.equal(ours["image_attention_mask"][:n, :n_img].long(), ref["image_attention_mask"][0].long())
        assert not ours["image_attention_mask"][:n, n_img:].any()
        checked += int(ours["num_images"]) > 1
    assert checked > 0, "no multi-image document among the samples"


def test_mask_equals_transformers_on_random_packed_sequences():
    """Several documents per sequence (</s> inside), consecutive images, images past the limit."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    from flamingo_dist.data.layout import image_attention_mask

    class Tok:
        eos_token_id = 2

        @staticmethod
        def convert_tokens_to_ids(token):
            return 9

    rng = random.Random(0)
    for _ in range(200):
        T = rng.randint(1, 40)
        ids = torch.tensor([[rng.choice([2, 9, 9, 5, 6, 7, 8, 1]) for _ in range(T)] for _ in range(2)])
        n = rng.randint(1, 4)
        inc, _ = image_attention_mask_for_packed_input_ids(ids, Tok, "pt")
        ref = incremental_to_binary_attention_mask(inc, "pt", num_classes=n)
        assert torch.equal(image_attention_mask(ids, 9, 2, n), ref), ids


def test_labels_ignore_padding_and_image_tokens_but_predict_eos(tokenizer):
    from flamingo_dist.data.layout import IGNORE_INDEX, labels_for

    V = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    ids = torch.tensor([[1, 5, V, V + 1, V, 6, 2, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    labels = labels_for(ids, attn, V + 1, V)
    assert labels.tolist() == [[1, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 2, IGNORE_INDEX, IGNORE_INDEX]]


def test_tokenizer_gets_the_two_new_tokens_at_v_and_v_plus_1(tokenizer):
    from flamingo_dist.data.synthetic import VOCAB_SIZE

    assert tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>"]) == [VOCAB_SIZE, VOCAB_SIZE + 1]


# ---------------------------------------------------------------- determinism and exact resume
def _feed(corpus, dp_rank, dp, workers, saved=None, streams=4):
    from flamingo_dist.config.load import load_config
    from flamingo_dist.data.feed import DataFeed, resolve_sources

    cfg = load_config(None, [f"data.shards={corpus}", "data.seq_len=64", "train.micro_batch_size=2",
                             f"data.num_workers={workers}", f"data.streams={streams}", "train.seed=5"])
    sources, _ = resolve_sources(cfg)
    return DataFeed(cfg, sources, _tok(corpus), dp_rank, dp, None, "cpu", saved)


def _tok(corpus):
    from flamingo_dist.data.synthetic import VOCAB_SIZE
    from flamingo_dist.hf.llama import load_tokenizer

    return load_tokenizer(f"{corpus}/tokenizer", VOCAB_SIZE)


def _rows(feed, n):
    """The next n micro-batches of the feed's one source, each as its rows' token tuples."""
    src = feed.sources[0]
    return [[tuple(r.tolist()) for r in feed.next(src)["input_ids"]] for _ in range(n)]


def _saved(feeds) -> dict:
    """What DataFeed.state_dict gathers: each stream's state from the rank that owns it."""
    merged = {}
    for f in feeds:
        merged.update({str(k): v for k, v in f.own_states()["main"].items()})
    f = feeds[0]
    from flamingo_dist.data.pipeline import shard_set_digest

    return {"slots": f.slots(), "streams": f.num_streams,
            "sources": {"main": {"shards": shard_set_digest(f.sources[0].shards), "states": merged}}}


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    from flamingo_dist.data.synthetic import write_corpus

    out = tmp_path_factory.mktemp("eight")
    write_corpus(str(out), num_docs=48, docs_per_shard=6, seed=3)  # 8 shards: 2 per stream
    return str(out)


def test_resumed_stream_equals_the_uninterrupted_one_for_2_ranks_x_2_workers(eight_shards):
    K, k = 12, 5
    full = []
    for r in range(2):
        feed = _feed(eight_shards, r, 2, 2)
        full.append(_rows(feed, K))
        feed.drawn = K
        assert all(st["epoch"] >= 1 or st["shard"] >= 1 for st in feed.states["main"].values()), \
            "the run must cross a shard boundary in every stream"
    assert full == [_rows(_feed(eight_shards, r, 2, 2), K) for r in range(2)]  # the same every time
    assert full[0] != full[1]
    # interrupted after k batches per rank: save what was consumed, resume, continue
    first = []
    for r in range(2):
        first.append(_feed(eight_shards, r, 2, 2))
        assert _rows(first[r], k) == full[r][:k]
        first[r].drawn = k
    saved = _saved(first)
    assert saved["slots"] == 2 * k
    for r in range(2):
        resumed = _feed(eight_shards, r, 2, 2, saved)
        assert _rows(resumed, K - k) == full[r][k:], f"rank {r} after the resume"
    # the global slot sequence: rank r's j-th batch is slot 2j + r; one rank with 4 workers resumes it
    glob = [full[g % 2][g // 2] for g in range(2 * K)]
    one = _feed(eight_shards, 0, 1, 4, saved)
    assert _rows(one, 2 * (K - k)) == glob[2 * k:]


def test_a_layout_that_cannot_continue_the_data_exactly_is_refused(eight_shards):
    from flamingo_dist.data.feed import DataStateError

    feeds = [_feed(eight_shards, r, 2, 1) for r in range(2)]
    for f in feeds:
        _rows(f, 2)
        f.drawn = 2
    saved = _saved(feeds)
    with pytest.raises(DataStateError, match=r"4 streams.*\(1 x 3\).*data.num_workers in \[1, 2, 4\]"):
        _feed(eight_shards, 0, 1, 3, saved)
    with pytest.raises(DataStateError, match="data.streams is 8 but the checkpoint's data was dealt to 4"):
        _feed(eight_shards, 0, 1, 1, saved, streams=8)
    with pytest.raises(DataStateError, match="has 8 shards but the data is dealt to 16 streams"):
        _feed(eight_shards, 0, 2, 1, streams=16)
