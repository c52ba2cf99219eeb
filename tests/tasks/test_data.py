import gzip

import pytest

from distill.data import read_idx_images, read_stsb
from distill.errors import DataError


def test_reads_real_stsb(data_dir):
    pairs = read_stsb(data_dir / "stsbenchmark", "test")
    assert len(pairs) == 1379 and 0 <= pairs.scores.min() and pairs.scores.max() <= 5


def test_missing_stsb_file(tmp_path):
    with pytest.raises(DataError, match="sts-train.csv"):
        read_stsb(tmp_path, "train")


def test_wrong_columns(tmp_path):
    (tmp_path / "sts-train.csv").write_text("a\tb\tc\n")
    with pytest.raises(DataError, match=r"sts-train.csv:1: expected 7 tab-separated columns"):
        read_stsb(tmp_path, "train")
    (tmp_path / "sts-train.csv").write_text("g\tf\ty\t1\tfive\ts1\ts2\n")
    with pytest.raises(DataError, match="score"):
        read_stsb(tmp_path, "train")


def test_reads_real_fashion_mnist(data_dir):
    images, labels = read_idx_images(data_dir / "fashion-mnist", "test", limit=100)
    assert images.shape == (100, 28, 28) and labels.max() <= 9


def test_idx_count_mismatch(tmp_path, data_dir):
    src = data_dir / "fashion-mnist"
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes((src / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw[:8].replace(raw[4:8], (5).to_bytes(4, "big")) + raw[8:13])
    with pytest.raises(DataError, match="10000 images but .* 5 labels"):
        read_idx_images(tmp_path, "test")


def test_idx_not_idx(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"hello world, not idx")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"nope")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_images(tmp_path, "test")
