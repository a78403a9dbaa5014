import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A small synthetic corpus (shards + tokenizer) shared by the tests."""
    from flamingo_dist.data.synthetic import write_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_corpus(str(out), num_docs=64, docs_per_shard=16, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def world1():
    """A world of one process (gloo), for the module's tests; torn down after them."""
    from flamingo_dist.distributed.groups import destroy_distributed, init_distributed

    yield init_distributed(1)
    destroy_distributed()


@pytest.fixture(scope="session")
def tokenizer(synthetic_corpus):
    """The synthetic corpus's word tokenizer (with IDEFICS' image tokens)."""
    from flamingo_dist.data.synthetic import VOCAB_SIZE
    from flamingo_dist.hf.llama import load_tokenizer

    return load_tokenizer(f"{synthetic_corpus}/tokenizer", VOCAB_SIZE)


@pytest.fixture(scope="session")
def synthetic_backbones():
    """The debug flavor's synthetic backbones where every trainer test and `make demo` find them
    (the repository's data/backbones), built once when missing (about 45 s)."""
    from flamingo_dist.config.load import load_config
    from flamingo_dist.demo.backbones import ensure_backbones

    cfg = load_config()
    root = os.path.join(REPO, cfg.model.synthetic_backbones)
    ensure_backbones(root, cfg.model.lm, cfg.model.vision.model_name, cfg.data.image_size)
    return root


# Modules whose tests start several processes (run_distributed, the launchers, a SLURM cluster) or
# train for a minute: `make test-fast` leaves them out (-m "not multiprocess"); `make test` runs all.
MULTIPROCESS_MODULES = {"test_launch", "test_slurm_cluster", "test_checkpoint", "test_export_tool", "test_learning",
                        "test_trainer", "test_eval_fewshot", "test_mixture", "test_train_on_shards", "test_demo",
                        "test_tp", "test_generate", "test_import_idefics", "test_hf_llama", "test_zero_step",
                        "test_zero3", "test_plan", "test_faults", "test_hangs", "test_rollback"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in MULTIPROCESS_MODULES:
            item.add_marker(pytest.mark.multiprocess)
