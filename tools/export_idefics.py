"""Export a committed checkpoint to Hugging Face IDEFICS, or to one plain fp32 safetensors file.

    python tools/export_idefics.py --checkpoint runs/debug/checkpoints/step_00000020 --out hf/
    python tools/export_idefics.py --checkpoint ... --out model.safetensors --plain

The IDEFICS directory loads with `IdeficsForVisionText2Text.from_pretrained` and
`IdeficsProcessor.from_pretrained`. Models IDEFICS cannot represent (GQA, other placements, ...)
are refused with the reason; `--plain` works for every model (our parameter names).
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    from flamingo_dist import setup_logging

    setup_logging()  # the package's messages (progress, resume, backbones) on rank 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a committed checkpoint directory (step_N)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--plain", action="store_true", help="one fp32 safetensors file of the whole model")
    args = p.parse_args(argv)

    import torch

    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed
    from flamingo_dist.hf.export_idefics import ExportError, export_idefics
    from flamingo_dist.training.checkpoint import CheckpointError, model_from_checkpoint

    init_distributed(1)
    try:
        model, cfg = model_from_checkpoint(args.checkpoint)
        if args.plain:
            from safetensors.torch import save_file

            state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
                     if isinstance(v, torch.Tensor)}
            save_file(state, args.out)
        else:
            from flamingo_dist.hf.llama import load_tokenizer
            from flamingo_dist.training.checkpoint import tokenizer_dir

            tok_dir = tokenizer_dir(cfg)
            tokenizer = load_tokenizer(tok_dir, cfg.model.lm.vocab_size) if os.path.isdir(tok_dir) else None
            if tokenizer is None:
                print(f"warning: no tokenizer at {tok_dir}; exporting the model without a processor", file=sys.stderr)
            dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
            export_idefics(model, cfg.model, args.out, tokenizer, dtype)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
