"""The pieces of one optimizer step, alone (training/step.py): batch accounting, the one per-step
read, the metrics; and the collate that gives the step its host numbers (data/processing.py)."""

import math

import pytest
import torch

from flamingo_dist.training.step import StepRead, account, read_step, step_metrics


def _batch(tokens: int, images: int, documents: int) -> dict:
    return {"_host": {"labelled_tokens": tokens, "images": images, "documents": documents}}


def test_accounting_weights_each_micro_batch_by_its_share_of_its_source_tokens():
    # two sources, weights 1.0 and 0.2; source 0 has 30 + 10 tokens, source 1 has 50
    items = [(0, _batch(30, 2, 1)), (1, _batch(50, 1, 3)), (0, _batch(10, 0, 1))]
    step = account(items, 2, [1.0, 0.2], dp_size=1, dp_group=None, device="cpu")
    assert step.source_of == [0, 1, 0] and step.tokens == [30, 50, 10]
    assert step.images == [2, 1, 0] and step.documents == [1, 3, 1]
    # DeepSpeed divides by the 3 micro-steps: weight x share x 3
    assert step.loss_scales == pytest.approx([1.0 * 30 / 40 * 3, 0.2 * 50 / 50 * 3, 1.0 * 10 / 40 * 3])
    assert all(isinstance(s, float) for s in step.loss_scales)  # nothing on the device at DP=1


def test_a_source_without_tokens_gets_a_finite_scale():
    step = account([(0, _batch(0, 0, 1))], 1, [1.0], 1, None, "cpu")
    assert step.loss_scales == [0.0]


def _read(losses, flags=(False, False, False), norm_sq=4.0):
    items = [(0, _batch(10, 1, 1)), (1, _batch(30, 2, 2)), (0, _batch(30, 0, 1))]
    step = account(items, 2, [1.0, 0.5], 1, None, "cpu")
    norm_sq = torch.tensor(norm_sq) if norm_sq is not None else None
    return read_step(step, [torch.tensor(x) for x in losses], norm_sq, 2, flags, tp_size=1, world_size=1,
                     device="cpu")


def test_the_read_carries_losses_counts_and_the_gradient_norm():
    read = _read([2.0, 1.0, 4.0])
    assert read.grad_norm == pytest.approx(2.0)  # sqrt of the squared norm
    assert read.loss_sums == pytest.approx([2.0 * 10 + 4.0 * 30, 1.0 * 30])
    assert read.tokens == [40.0, 30.0] and read.images == [1.0, 2.0] and read.documents == [2.0, 2.0]
    assert read.non_finite_losses == 0 and not read.skip
    assert not (read.stop or read.save_due or read.data_error)


def test_a_non_finite_loss_is_counted_left_out_of_the_sums_and_skips_the_step():
    read = _read([float("nan"), 1.0, float("inf")])
    assert read.non_finite_losses == 2 and read.skip
    assert read.loss_sums == [0.0, 30.0]  # no NaN in what the metrics see


def test_a_non_finite_gradient_norm_skips_the_step():
    assert _read([1.0, 1.0, 1.0], norm_sq=float("inf")).skip
    assert _read([1.0, 1.0, 1.0], norm_sq=float("nan")).skip
    # DeepSpeed's own step decides the norm: only the losses count here
    read = _read([1.0, 1.0, 1.0], norm_sq=None)
    assert read.grad_norm is None and not read.skip


def test_the_flags_arrive_in_the_read():
    read = _read([1.0, 1.0, 1.0], flags=(True, False, True))
    assert read.stop and not read.save_due and read.data_error


def test_metrics_come_from_the_read():
    read = StepRead(grad_norm=0.5, non_finite_losses=0, stop=False, save_due=False, data_error=False,
                    loss_sums=[8.0, 3.0], tokens=[4.0, 6.0], images=[2.0, 0.0], documents=[1.0, 3.0])
    m = step_metrics(read, [1.0, 0.5], ["a", "b"], lr=1e-3, grad_norm=0.5, applied=True, skipped_steps=2, elapsed=2.0)
    assert m["loss"] == pytest.approx(1.0 * 2.0 + 0.5 * 0.5)
    assert m["tokens_per_s"] == 5.0 and m["images_per_s"] == 1.0 and m["grad_norm"] == 0.5
    assert m["loss/b"] == 0.5 and m["documents_per_s/b"] == 1.5 and m["skipped_steps"] == 2.0
    skipped = step_metrics(dict_replace(read, non_finite_losses=1), [1.0, 0.5], ["a", "b"], 1e-3, 0.5, False, 3, 2.0)
    assert math.isnan(skipped["loss"]) and math.isnan(skipped["grad_norm"]) and skipped["step_applied"] == 0.0


def dict_replace(read: StepRead, **changes) -> StepRead:
    import dataclasses

    return dataclasses.replace(read, **changes)


def test_collate_ships_the_media_slots_and_the_host_numbers(tokenizer):
    """The loader computes what the step would otherwise read back: the slots some token attends to
    (the model's own rule), the labelled tokens, images and documents; one document per row drops
    the document ids (causal attention is then the same)."""
    from flamingo_dist.data.layout import document_text, labelled_tokens
    from flamingo_dist.data.processing import Encoded, Processor, collate

    proc = Processor(tokenizer, seq_len=48, max_images=3, image_size=8)

    def enc(*items):  # None = an image
        text, n = document_text([object() if x is None else x for x in items], tokenizer.bos_token,
                                tokenizer.eos_token)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return Encoded(ids, [torch.full((3, 8, 8), 7, dtype=torch.uint8)] * n)

    two = proc.sequence([enc("red", None, "square", None, "blue"), enc("red square")])
    one = proc.sequence([enc("blue", None, "circle")])
    batch = collate([two, one])
    used = batch["image_attention_mask"].bool().any(dim=1).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(batch["media_slots"], used) and batch["media_slots"].tolist() == [0, 1, 3]
    assert batch["_host"] == {"labelled_tokens": labelled_tokens(batch["labels"]), "images": 3, "documents": 3}
    assert "document_ids" in batch  # row 0 packs two documents
    single = collate([one, proc.sequence([enc("red square")])])
    assert "document_ids" not in single and single["media_slots"].tolist() == [0]
    text_only = collate([proc.sequence([enc("red square")])])
    assert text_only["media_slots"].tolist() == [0]  # nothing attended to: slot 0 is encoded all the same
