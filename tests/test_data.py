"""Token layout, labels and image attention mask against transformers' IdeficsProcessor."""

import json
import random

import pytest
import torch


@pytest.fixture(scope="module")
def tokenizer(synthetic_corpus):
    from flamingo_dist.data.synthetic import VOCAB_SIZE
    from flamingo_dist.hf_llama import load_tokenizer

    return load_tokenizer(f"{synthetic_corpus}/tokenizer", VOCAB_SIZE)


def idefics_processor(tokenizer):
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    return IdeficsProcessor(IdeficsImageProcessor(image_size=32), tokenizer)


def first_samples(corpus: str, n: int):
    import webdataset as wds

    from flamingo_dist.data.pipeline import list_shards

    out = []
    for s in wds.tarfile_samples([{"url": p} for p in list_shards(corpus)]):
        out.append(s)
        if len(out) == n:
            return out
    return out


def test_pipeline_layout_and_mask_equal_idefics_processor(synthetic_corpus, tokenizer):
    from PIL import Image

    from flamingo_dist.data.pipeline import InterleavedDataset, list_shards

    ds = InterleavedDataset(list_shards(synthetic_corpus), tokenizer, seq_len=128, max_images=3, image_size=32,
                            micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    processor = idefics_processor(tokenizer)
    checked = 0
    for sample in first_samples(synthetic_corpus, 12):
        ours = ds.process(sample)
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
        image_attention_mask_for_packed_input_ids, incremental_to_binary_attention_mask)

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


def _documents(shards, tokenizer, micro_batch, rank, dp, workers, batches, start=0):
    """The documents of a rank's first `batches` micro-batches, batch by batch."""
    from flamingo_dist.data.pipeline import build_dataloader

    it = iter(build_dataloader(shards, tokenizer, 64, 3, 32, micro_batch, rank, dp, seed=5, num_workers=workers,
                               start=start))
    return [[tuple(row.tolist()) for row in next(it)["input_ids"]] for _ in range(batches)]


def test_data_position_is_one_global_document_count_at_any_layout(synthetic_corpus, tokenizer):
    from flamingo_dist.data.pipeline import list_shards

    shards = list_shards(synthetic_corpus)  # 4 shards of 16 documents
    stream = [b[0] for b in _documents(shards, tokenizer, 1, 0, 1, 0, 40)]  # one rank, one by one
    assert len(set(stream)) == len(stream)
    assert stream == [b[0] for b in _documents(shards, tokenizer, 1, 0, 1, 0, 40)]  # the same every time
    # 2 ranks x 2 loader workers, micro-batch 2: rank r's j-th batch is global slot 2j + r, so after
    # k batches on every rank exactly the first 4k documents are consumed (here across a shard boundary)
    ranks = [_documents(shards, tokenizer, 2, r, 2, 2, 5) for r in range(2)]
    for r in range(2):
        for j, batch in enumerate(ranks[r]):
            assert batch == stream[(2 * j + r) * 2:(2 * j + r) * 2 + 2], (r, j)
    # resuming at document 12 on another layout (1 rank, micro-batch 4, 2 workers) continues the stream
    resumed = _documents(shards, tokenizer, 4, 0, 1, 2, 5, start=12)
    assert sum(resumed, []) == stream[12:32]


def test_missing_shards_fail_naming_the_pattern(tmp_path):
    from flamingo_dist.data.pipeline import list_shards

    with pytest.raises(FileNotFoundError, match="data.shards"):
        list_shards(str(tmp_path / "nothing-{000..003}.tar"))
