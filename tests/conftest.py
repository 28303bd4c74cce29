import os
import sys

import pytest

# Tests never touch the network: mergekit's model card and transformers would otherwise ask the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))  # `import tiny`


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    import tiny

    path = str(tmp_path_factory.mktemp("tokenizer"))
    tiny.make_tokenizer(path)
    return path
