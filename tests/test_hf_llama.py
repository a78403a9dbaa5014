"""Our TP LM against transformers' LlamaForCausalLM (the external reference), at TP=1 and TP=2."""

import json
import os

import pytest
import torch
from distributed import run_distributed

CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "theta": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
}


def save_random_llama(path: str, vocab_size: int = 96, **kw) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    theta = kw.pop("rope_theta", 10000.0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=kw.pop("tie_word_embeddings", False),
                      rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)


def reference_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _our_logits(layout, path: str, ids: torch.Tensor) -> torch.Tensor:
    from flamingo_dist.config.schema import LMConfig
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.hf.llama import SafetensorsDir, load_lm_weights, resolve_lm_config
    from flamingo_dist.models.lm import TPLlama

    cfg = LMConfig(path=path)
    resolve_lm_config(cfg)
    lm = TPLlama(cfg, tp_group(), torch.float32)
    load_lm_weights(lm, SafetensorsDir(path))
    with torch.no_grad():
        return lm.gather_logits(lm(ids))[..., : cfg.vocab_size]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_tp1_and_tp2(case, tmp_path):
    path = str(tmp_path / "llama")
    save_random_llama(path, **dict(CASES[case]))
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(path, ids)
    for tp in (1, 2):
        outs = run_distributed(_our_logits, tp, tp, tmp_path / f"tp{tp}", path, ids)
        for ours in outs:  # every rank holds the same gathered logits
            rel = (ours - ref).abs().max() / ref.abs().max()
            assert rel <= 1e-4, f"{case} TP={tp}: relative error {rel:.2e}"


def test_config_mapping_reads_gqa_tied_theta(tmp_path):
    from flamingo_dist.hf.llama import read_hf_llama_config

    save_random_llama(str(tmp_path), num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_theta=500000.0)
    got = read_hf_llama_config(str(tmp_path))
    assert (got["num_heads"], got["num_kv_heads"], got["tie_embeddings"], got["rope_theta"]) == (4, 2, True, 500000.0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    """A checkpoint split into several safetensors shards (with an index) gives the same model."""
    from transformers import LlamaForCausalLM

    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    save_random_llama(single, num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len(set(json.load(open(os.path.join(sharded, "model.safetensors.index.json")))["weight_map"].values())) > 1
    ids = torch.randint(0, 96, (1, 9))
    a = run_distributed(_our_logits, 1, 1, tmp_path / "a", single, ids)[0]
    b = run_distributed(_our_logits, 1, 1, tmp_path / "b", sharded, ids)[0]
    assert torch.equal(a, b)


def test_wrong_architecture_is_named(tmp_path):
    from flamingo_dist.hf.llama import CheckpointError, read_hf_llama_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        read_hf_llama_config(str(tmp_path))
    with pytest.raises(CheckpointError, match="model.lm.path: .*nowhere is not a directory"):
        read_hf_llama_config(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_hf_llama_config(str(tmp_path / "empty"))


def _load_mismatched(layout, path):
    from flamingo_dist.config.schema import LMConfig
    from flamingo_dist.distributed.groups import tp_group
    from flamingo_dist.hf.llama import CheckpointError, DictTensors, SafetensorsDir, load_lm_weights, resolve_lm_config
    from flamingo_dist.models.lm import TPLlama

    cfg = LMConfig(path=path)
    resolve_lm_config(cfg)
    cfg.intermediate_size = 48  # the model no longer fits the checkpoint
    errors = []
    try:
        load_lm_weights(TPLlama(cfg, tp_group()), SafetensorsDir(path))
    except CheckpointError as e:
        errors.append(str(e))
    cfg.intermediate_size = 64
    tensors = SafetensorsDir(path)
    partial = {n: tensors.read(n, 0, 0, tensors.shape(n)[0]) for n in tensors.names() if "layers.2.mlp.up_proj" not in n}
    try:
        load_lm_weights(TPLlama(cfg, tp_group()), DictTensors(partial))
    except CheckpointError as e:
        errors.append(str(e))
    return errors


def test_shape_mismatch_and_missing_tensor_are_named(tmp_path):
    path = str(tmp_path / "llama")
    save_random_llama(path, num_attention_heads=4, num_key_value_heads=4)
    (errors,) = run_distributed(_load_mismatched, 1, 1, tmp_path / "out", path)
    assert len(errors) == 2
    assert "model.layers.0.mlp.gate_proj.weight has shape [64, 32], expected [48, 32]" in errors[0]
    assert "model.layers.2.mlp.up_proj.weight is missing" in errors[1]


def test_tokenizer_with_a_different_vocabulary_is_refused(synthetic_corpus):
    from flamingo_dist.hf.llama import CheckpointError, load_tokenizer

    with pytest.raises(CheckpointError, match="vocab_size is 1000"):
        load_tokenizer(f"{synthetic_corpus}/tokenizer", 1000)
