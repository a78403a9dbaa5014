"""The benchmark tools' own arithmetic (the benchmarks themselves are run by hand: docs/benchmarks.md)."""

import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_profile_breakdown_puts_matrix_products_and_attention_apart():
    """bench_openflamingo --profile on a real profile: a step of one large matrix product and one
    SDPA call (forward and backward) with a little elementwise work; the three parts add up to
    all the operators' time, the matrix product lands in `matmul`, SDPA and its backward in
    `attention`."""
    from torch.profiler import ProfilerActivity, profile

    bench = _tool("bench_openflamingo")
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    q = torch.randn(2, 4, 64, 32, requires_grad=True)

    def step():
        (a @ b).relu_()
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    parts = bench.op_time_breakdown(events, steps=2)
    # every operator is counted once, in one of the three parts
    assert parts["matmul"] + parts["attention"] + parts["other"] == pytest.approx(sum(us for _, us in events) / 1e3 / 2)
    mm_us = sum(us for name, us in events if name == "aten::mm")
    sdpa_us = sum(us for name, us in events if "scaled_dot_product" in name)
    assert mm_us > 0 and sdpa_us > 0
    relu_us = sum(us for name, us in events if name == "aten::relu_")
    assert relu_us > 0
    eps = 1e-9  # float sums in another order
    assert parts["matmul"] >= mm_us / 1e3 / 2 - eps
    assert parts["attention"] >= sdpa_us / 1e3 / 2 - eps
    assert parts["other"] >= relu_us / 1e3 / 2 - eps


def test_the_ceiling_is_openflamingos_step_over_our_matrix_products():
    bench = _tool("bench_openflamingo")

    def run(stack, step_s, matmul_ms):
        return {"stack": stack, "precision": "fp32", "step_times_s": [step_s] * 3, "page_faults": [0],
                "flops_per_step": 1, "trainable_parameters": 1,
                "op_ms_per_step": {"matmul": matmul_ms, "attention": 1.0, "other": 1.0, "total": matmul_ms + 2}}

    summary = bench.summarize([run("ours", 1.0, 600.0), run("ours", 1.2, 800.0), run("ours", 1.1, 700.0),
                               run("ours-compiled", 0.9, 650.0), run("openflamingo", 1.5, 900.0)])["fp32"]
    assert summary["ours"]["op_ms_per_step_median"]["matmul"] == 700.0
    assert summary["ceiling_ours_over_openflamingo"] == pytest.approx(1500 / 700)
    assert summary["ceiling_ours-compiled_over_openflamingo"] == pytest.approx(1500 / 650)
    assert summary["ratio_ours-compiled_over_openflamingo"] == pytest.approx((4 / 0.9) / (4 / 1.5))
    assert summary["ratio_ours_over_openflamingo"] == pytest.approx((4 / 1.1) / (4 / 1.5))


@pytest.mark.parametrize("shape", ["small", "3b"])
def test_each_comparison_shape_gives_both_stacks_the_same_text_and_images(shape):
    """bench_openflamingo --shape: every row holds IMAGES images at IMAGE_AT in both stacks' layouts
    (ours: <fake><image><fake>, OpenFlamingo: <image> and <|endofchunk|> before the next one), and
    our batch, through the loader's collate, encodes exactly those slots."""
    bench = _tool("bench_openflamingo")
    bench.use_shape(shape)
    V = bench.LM["vocab_size"]
    per_row = [bench.IMAGES] * bench.BATCH
    ours, theirs = bench.token_ids(V + 1, V, None, per_row), bench.token_ids(V + 1, None, V + 2, per_row)
    assert ours.shape == (bench.BATCH, bench.SEQ) and max(bench.IMAGE_AT) < bench.SEQ - 1
    assert ((ours == V + 1).sum(1) == bench.IMAGES).all() and ((theirs == V + 1).sum(1) == bench.IMAGES).all()
    assert ((theirs == V + 2).sum(1) == bench.IMAGES).all()  # each image's text ends with <|endofchunk|>
    batch = bench.harness_batch(per_row)
    assert batch["media_slots"].tolist() == list(range(bench.BATCH * bench.IMAGES))
    assert batch["_host"]["images"] == bench.BATCH * bench.IMAGES and "document_ids" not in batch
    assert batch["pixel_values"].shape == (bench.BATCH, bench.IMAGES, 3, bench.IMAGE_SIZE, bench.IMAGE_SIZE)
