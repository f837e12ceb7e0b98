import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

import tinystories  # noqa: E402


def first_stories(path, n):
    return [s for stories, _ in tinystories.read_file(path) for s in stories][:n]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A prepared data dir from a slice of the real shared TinyStories: 300 train and 80
    validation stories, a 512-token tokenizer and its token files."""
    root = tmp_path_factory.mktemp("tinystories")
    source = root / "source"
    source.mkdir()
    for name, n in (("train-000.txt", 300), ("valid-000.txt", 80)):
        stories = first_stories(SHARED / "tinystories" / name, n)
        (source / name).write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    data_dir = str(root / "data")
    tinystories.download(data_dir, str(source))
    tinystories.train_vocab(512, data_dir)
    tinystories.pretokenize(512, data_dir, quiet=True)
    return data_dir
