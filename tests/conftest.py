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
