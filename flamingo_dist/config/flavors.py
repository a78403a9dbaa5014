"""Named model shapes, side by side: `debug` (tests; seconds on CPU) and the paper's 3B, 9B and
80B (Alayrac et al. 2022, Table 5) on LLaMA-style LMs.

The paper's LMs are Chinchilla models; ours are LLaMA-family shapes of the same size class, as
IDEFICS did (LLaMA-7B for 9B, LLaMA-65B for 80B). Cross-attention every layer for 3B, every 4th
for 9B, every 7th for 80B, as in the paper. An 80-layer LM with interval 7 is not exportable to
IDEFICS (it builds L // interval blocks); the exporter says so.
"""

from __future__ import annotations

from flamingo_dist.config.schema import (
    DataConfig,
    JobConfig,
    LMConfig,
    ModelConfig,
    ResamplerConfig,
    TrainConfig,
    VisionConfig,
    XAttnConfig,
)


def _debug() -> JobConfig:
    return JobConfig(
        flavor="debug",
        model=ModelConfig(
            # Two layers of eight heads: the shape whose pretraining on the synthetic text learns
            # to read attributes from context within a few hundred steps (four layers of four
            # heads often did not in a thousand; docs/learning.md).
            lm=LMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, max_position_embeddings=256),
            vision=VisionConfig(model_name="flamingo-debug-vit", activation="gelu"),
            resampler=ResamplerConfig(num_latents=8, depth=2, num_heads=4, head_dim=16),
            xattn=XAttnConfig(cross_layer_interval=1),
            synthetic_backbones="data/backbones",
        ),
        # 3e-3: the fastest of 1e-3, 3e-3 and 1e-2 at learning to read the images (1e-2 is slower
        # to, 1e-3 slower still; docs/learning.md).
        train=TrainConfig(steps=20, micro_batch_size=4, lr=3e-3, warmup_steps=3),
        data=DataConfig(seq_len=64, max_images=3, image_size=32),
    )


def _big(flavor: str, lm: LMConfig, interval: int, vision: str) -> JobConfig:
    return JobConfig(
        flavor=flavor,
        model=ModelConfig(
            lm=lm,
            vision=VisionConfig(model_name=vision, activation="gelu"),
            resampler=ResamplerConfig(num_latents=64, depth=6, num_heads=16, head_dim=96),
            xattn=XAttnConfig(cross_layer_interval=interval),
        ),
        # log_every 10: a logged step reads the gates and data counters back from the device, the
        # others read it once (the step's flags)
        train=TrainConfig(steps=250_000, micro_batch_size=4, lr=1e-4, warmup_steps=5000,
                          schedule="constant", activation_checkpointing=True, log_every=10),
        data=DataConfig(seq_len=256, max_images=5, image_size=224, num_workers=4),
    )


FLAVORS = {
    "debug": _debug,
    "3b": lambda: _big("3b", LMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_layers=24, num_heads=16), 1, "ViT-L-14"),
    "9b": lambda: _big("9b", LMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_layers=32, num_heads=32), 4, "ViT-H-14"),
    "80b": lambda: _big("80b", LMConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                        num_layers=80, num_heads=64, num_kv_heads=8), 7, "ViT-H-14"),
}


def get_flavor(name: str) -> JobConfig:
    from flamingo_dist.config.schema import ConfigError

    if name not in FLAVORS:
        raise ConfigError(f"flavor: unknown flavor {name!r} (known: {', '.join(FLAVORS)})")
    return FLAVORS[name]()
