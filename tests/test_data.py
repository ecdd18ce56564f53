"""Tests for eejax.data: checksums, IDX/JPEG parsing, the embedded split, splits, batching, text, TFDS."""
import gzip
import hashlib
import re
import shutil
import sys

import numpy as np
import pytest

from eejax.data import files, pipeline, text, tfds_source, vision
from eejax.data.pipeline import BatchIterator

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def indexed_dataset(n, name="mnist", split="train"):
    """Synthetic dataset whose image i encodes i in its first two pixels, so batches can be traced to indices."""
    images = np.zeros((n, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    return vision.ArrayDataset(images, (np.arange(n) % 10).astype(np.int32), name, 10, split)


def indices_of(ds_or_images):
    images = ds_or_images.images_NxHxWxC if isinstance(ds_or_images, vision.ArrayDataset) else ds_or_images
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


def batch_indices(batch):
    """Undo BatchIterator's normalisation to recover the example indices of a batch of `indexed_dataset`."""
    mean, std = pipeline.NORMALIZATION["mnist"].mean_C[0], pipeline.NORMALIZATION["mnist"].std_C[0]
    pixels = np.rint((batch["image"] * std + mean) * 255).astype(np.uint8)
    return indices_of(pixels)


# --- files.py -----------------------------------------------------------------------------------------------

def test_checksum_table_matches_readmes_and_files(shared_data):
    for dataset, table in files.CHECKSUMS.items():
        readme = (shared_data / dataset / "README.md").read_text()
        for filename, sha in table.items():
            assert sha in readme, (dataset, filename)
            assert files.verified_path(shared_data, dataset, filename) == shared_data / dataset / filename


def test_bad_checksum_is_one_line_naming_file_and_hashes(shared_data, tmp_path):
    (tmp_path / "mnist").mkdir()
    copy = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray((shared_data / "mnist" / copy.name).read_bytes())
    raw[100] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(files.DataError) as err:
        files.verified_path(tmp_path, "mnist", copy.name)
    msg = str(err.value)
    assert "\n" not in msg and str(copy) in msg
    assert files.CHECKSUMS["mnist"][copy.name] in msg and hashlib.sha256(raw).hexdigest() in msg
    assert isinstance(err.value, ValueError)


def test_missing_file_message(tmp_path):
    with pytest.raises(files.DataError, match=r"^missing: .*t10k-labels.*expected sha256 f7ae60f9.*EEJAX_DATA_DIR\)$"):
        files.verified_path(tmp_path, "mnist", "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(files.DataError, match="no checksum pinned"):
        files.verified_path(tmp_path, "mnist", "other.gz")


def test_hash_is_cached_until_the_file_changes(shared_data, tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    copy = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    shutil.copy(shared_data / "mnist" / copy.name, copy)
    files.verified_path(tmp_path, "mnist", copy.name)
    with monkeypatch.context() as m:  # a second verification must not rehash the unchanged file
        m.setattr(files.hashlib, "sha256", lambda: pytest.fail("rehashed an unchanged file"))
        files.verified_path(tmp_path, "mnist", copy.name)
    copy.write_bytes(copy.read_bytes() + b"x")  # new size/mtime: the stale verdict must not be reused
    with pytest.raises(files.DataError, match="checksum mismatch"):
        files.verified_path(tmp_path, "mnist", copy.name)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(files.ENV_VAR, str(tmp_path))
    assert files.resolve_data_dir() == tmp_path
    assert files.resolve_data_dir(tmp_path / ".") == tmp_path
    with pytest.raises(files.DataError, match="does not exist"):
        files.resolve_data_dir(tmp_path / "nope")
    monkeypatch.delenv(files.ENV_VAR)
    monkeypatch.setattr(files, "_SIBLING_DATA_DIR", tmp_path / "nope")
    with pytest.raises(files.DataError, match="^no data directory: pass --data_dir or set EEJAX_DATA_DIR"):
        files.resolve_data_dir()


# --- vision.py ----------------------------------------------------------------------------------------------

def test_mnist_and_fashion_mnist_test_splits(shared_data):
    mnist = vision.load_mnist(shared_data, "test")
    assert mnist.images_NxHxWxC.shape == (10000, 28, 28, 1) and mnist.images_NxHxWxC.dtype == np.uint8
    assert mnist.labels_N.dtype == np.int32 and mnist.split == "test" and mnist.num_classes == 10
    assert np.bincount(mnist.labels_N).tolist() == MNIST_TEST_COUNTS
    fashion = vision.load_fashion_mnist(shared_data, "test")
    assert fashion.name == "fashion_mnist" and np.bincount(fashion.labels_N).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        vision.load_mnist(shared_data, "validation")


def test_read_idx_rejects_bad_magic_and_size(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03"))
    np.testing.assert_array_equal(vision.read_idx(path, 1), [1, 2, 3])
    with pytest.raises(files.DataError, match="bad IDX magic 00000801, expected 00000803"):
        vision.read_idx(path, 3)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"\x01\x02\x03"))
    with pytest.raises(files.DataError, match="payload has 3 bytes"):
        vision.read_idx(path, 1)


def test_cifar10_jpeg_test_split_decodes_and_caches(shared_data, tmp_path, monkeypatch):
    ds = vision.load_cifar10_jpeg(shared_data, "test", cache_dir=tmp_path)
    assert ds.images_NxHxWxC.shape == (10000, 32, 32, 3) and ds.images_NxHxWxC.dtype == np.uint8
    assert np.bincount(ds.labels_N).tolist() == [1000] * 10
    # JPEG copy of real CIFAR-10 test images: channel means near the published train means.
    np.testing.assert_allclose(ds.images_NxHxWxC.mean((0, 1, 2)) / 255, [0.4914, 0.4822, 0.4465], atol=0.01)
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("cifar10_jpeg-fdef8a4f") and cached.suffix == ".npy"
    monkeypatch.setattr(vision, "_decode_jpegs", lambda *a: pytest.fail("decoded again despite the cache"))
    again = vision.load_cifar10_jpeg(shared_data, "test", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images_NxHxWxC, ds.images_NxHxWxC)


def test_embedded_equals_shared_mnist_test(shared_data):
    embedded = vision.load_embedded_mnist()
    shared = vision.load_mnist(shared_data, "test")
    np.testing.assert_array_equal(embedded.images_NxHxWxC, shared.images_NxHxWxC)
    np.testing.assert_array_equal(embedded.labels_N, shared.labels_N)
    assert vision.EMBEDDED_MNIST_PATH.stat().st_size <= 5 * 2**20
    assert vision.EMBEDDED_MNIST_SHA256 in (vision.EMBEDDED_MNIST_PATH.parent / "README.md").read_text()


def test_make_embedded_reproduces_the_pinned_npz(shared_data, tmp_path):
    from eejax.data.embedded import make_embedded
    assert make_embedded.make(shared_data, tmp_path / "mnist_test.npz") == vision.EMBEDDED_MNIST_SHA256


def test_embedded_needs_no_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(files.ENV_VAR, str(tmp_path / "nope"))  # any use of the data dir would now fail
    ds = pipeline.get_dataset("mnist_embedded", "all")
    assert ds.images_NxHxWxC.shape == (10000, 28, 28, 1) and np.bincount(ds.labels_N).tolist() == MNIST_TEST_COUNTS


def test_embedded_rejects_altered_npz(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_test.npz"
    bad.write_bytes(vision.EMBEDDED_MNIST_PATH.read_bytes()[:-1])
    monkeypatch.setattr(vision, "EMBEDDED_MNIST_PATH", bad)
    with pytest.raises(files.DataError, match="checksum mismatch for .*mnist_test.npz"):
        vision.load_embedded_mnist()


# --- pipeline.py: registry and splits -------------------------------------------------------------------------

def test_get_dataset_errors():
    known = "mnist, fashion_mnist, cifar10, mnist_embedded"
    with pytest.raises(ValueError, match=f"^unknown dataset 'svhn'; known: {known}$"):
        pipeline.get_dataset("svhn", "train")
    with pytest.raises(ValueError, match="unknown source 'web'"):
        pipeline.get_dataset("mnist", "train", source="web")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        pipeline.get_dataset("mnist_embedded", "val")


def test_split_train_val_disjoint_deterministic_and_train_only():
    ds = indexed_dataset(1000)
    train, val = pipeline.split_train_val(ds, 0.1, seed=3)
    assert (len(train), len(val)) == (900, 100) and (train.split, val.split) == ("train", "validation")
    assert sorted(indices_of(train).tolist() + indices_of(val).tolist()) == list(range(1000))
    np.testing.assert_array_equal(train.labels_N, indices_of(train) % 10)  # labels travel with their images
    again = pipeline.split_train_val(ds, 0.1, seed=3)
    np.testing.assert_array_equal(indices_of(again.val), indices_of(val))
    assert set(indices_of(pipeline.split_train_val(ds, 0.1, seed=4).val)) != set(indices_of(val))
    with pytest.raises(ValueError, match="refusing to carve a validation split out of the 'test' split"):
        pipeline.split_train_val(indexed_dataset(1000, split="test"), 0.1, seed=0)


def test_split_train_val_refuses_real_test_split(shared_data):
    with pytest.raises(ValueError, match="refusing"):
        pipeline.split_train_val(pipeline.get_dataset("mnist", "test", data_dir=shared_data), 0.1, seed=0)


def test_split_embedded_fixed_test_part():
    ds = indexed_dataset(10000, split="test")
    a, b = pipeline.split_embedded(ds, seed=0), pipeline.split_embedded(ds, seed=1)
    assert [len(part) for part in a] == [7000, 1000, 2000]
    for split in (a, b):
        np.testing.assert_array_equal(indices_of(split.test), np.arange(8000, 10000))
        assert sorted(np.concatenate([indices_of(split.train), indices_of(split.val)]).tolist()) == list(range(8000))
    assert set(indices_of(a.val)) != set(indices_of(b.val))
    demo = pipeline.get_dataset("mnist_embedded", "validation")
    np.testing.assert_array_equal(demo.labels_N, vision.load_embedded_mnist().labels_N[np.sort(
        np.random.default_rng(pipeline.EMBEDDED_SEED).permutation(8000)[:1000])])


# --- pipeline.py: BatchIterator -----------------------------------------------------------------------------

def test_batches_normalised_and_ordered_by_seed_and_epoch():
    ds = indexed_dataset(100)
    it = BatchIterator(ds, 32, seed=5)
    assert it.num_batches_per_epoch == 3
    batches = [next(it) for _ in range(4)]  # the 4th batch starts epoch 1
    for (epoch, index), batch in zip([(0, 0), (0, 1), (0, 2), (1, 0)], batches):
        expected = np.random.default_rng([5, epoch]).permutation(100)[32 * index: 32 * (index + 1)]
        np.testing.assert_array_equal(batch_indices(batch), expected)
        np.testing.assert_array_equal(batch["label"], expected % 10)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    mean, std = pipeline.NORMALIZATION["mnist"].mean_C[0], pipeline.NORMALIZATION["mnist"].std_C[0]
    first = batches[0]["image"]
    np.testing.assert_allclose(first, (ds.images_NxHxWxC[batch_indices(batches[0])] / 255 - mean) / std, rtol=1e-6)
    assert it.state_dict() == {"epoch": 1, "index": 1}


@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_resume_gives_identical_batches(k):
    ds = indexed_dataset(70)
    it = BatchIterator(ds, 16, seed=11)  # 4 batches per epoch: k = 5 resumes inside epoch 1
    for _ in range(k):
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(6)]
    resumed = BatchIterator(ds, 16, seed=11)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    with pytest.raises(ValueError, match="bad iterator state"):
        resumed.load_state_dict({"epoch": 0, "index": 9})


def test_per_host_slices_reassemble_global_batch():
    ds = indexed_dataset(100)
    global_it = BatchIterator(ds, 24, seed=2)
    hosts = [BatchIterator(ds, 24, seed=2, process_index=p, process_count=4) for p in range(4)]
    for _ in range(5):
        want = next(global_it)
        local = [next(h) for h in hosts]
        assert local[0]["image"].shape == (6, 2, 2, 1)
        got = np.empty_like(want["image"])
        for p, batch in enumerate(local):
            got[p::4] = batch["image"]
        np.testing.assert_array_equal(got, want["image"])
    with pytest.raises(ValueError, match="must divide by process_count=5"):
        BatchIterator(ds, 24, seed=2, process_index=0, process_count=5)


def test_eval_iterator_is_one_ordered_pass_with_short_last_batch():
    ds = indexed_dataset(70)
    it = BatchIterator(ds, 32, seed=0, shuffle=False, drop_remainder=False)
    batches = list(it)
    assert it.num_batches_per_epoch == 3 and [len(b["label"]) for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([batch_indices(b) for b in batches]), np.arange(70))
    assert list(it) == []


def test_normalization_required_for_unknown_dataset():
    ds = indexed_dataset(10, name="toy")
    with pytest.raises(ValueError, match="no normalization for 'toy'"):
        BatchIterator(ds, 4)
    norm = pipeline.Normalization.from_dataset(ds)
    batch = next(BatchIterator(ds, 10, normalization=norm, shuffle=False))
    np.testing.assert_allclose(batch["image"].mean(), 0, atol=1e-6)


# --- text.py ------------------------------------------------------------------------------------------------

def test_tiny_shakespeare_split_and_char_tokenizer(shared_data):
    train = text.load_text(shared_data, "tiny_shakespeare", "train")
    val = text.load_text(shared_data, "tiny_shakespeare", "validation")
    assert (len(train), len(val)) == (1003854, 111540)  # int(0.9 * 1,115,394) characters, then the rest
    assert train.startswith("First Citizen:") and (train + val).encode() == (
        shared_data / "tiny-shakespeare" / "input.txt").read_bytes()
    tok = text.CharTokenizer.from_text(train)
    assert tok.vocab_size == 65
    ids = tok.encode(val)
    assert ids.dtype == np.int32 and tok.decode(ids) == val
    np.testing.assert_array_equal(ids[:20], [tok.chars.index(c) for c in val[:20]])
    assert text.CharTokenizer.from_dict(tok.to_dict()) == tok
    with pytest.raises(ValueError, match="character '€' at position 2 is not in the 65-character vocabulary"):
        tok.encode("ab€")


def test_byte_tokenizer_round_trip():
    tok = text.ByteTokenizer()
    s = "Alice’s — naïve"
    ids = tok.encode(s)
    assert tok.vocab_size == 256 and ids.dtype == np.int32 and len(ids) == len(s.encode())
    assert tok.decode(ids) == s and text.ByteTokenizer.from_dict(tok.to_dict()) == tok


def test_gutenberg_and_wikitext(shared_data):
    train = text.load_text(shared_data, "gutenberg", "train")
    val = text.load_text(shared_data, "gutenberg", "validation")
    assert not re.search(r"^\*\*\* ", train, re.M)
    books = [(shared_data / "gutenberg-books" / f"pg{n}.txt").read_text() for n in (84, 174, 1342, 1661, 2701)]
    dropped = [line for line in books[-1].splitlines(keepends=True) if line.startswith("*** ")]
    assert len(dropped) == 2  # Moby Dick's START / END markers
    assert len(train) == sum(map(len, books)) - sum(map(len, dropped)) + 4  # 4 newlines join 5 books
    assert train.startswith("Frankenstein;") and "Alice’s Adventures in Wonderland" in val[:100]
    wiki = text.load_text(shared_data, "wikitext2", "validation")
    assert sum(len(line.split()) + 1 for line in wiki.splitlines(keepends=True)) == 217646
    with pytest.raises(ValueError, match="unknown text dataset/split wikitext2/train"):
        text.load_text(shared_data, "wikitext2", "train")


# --- tfds_source.py -----------------------------------------------------------------------------------------

def test_tfds_mock_mnist():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = pipeline.get_dataset("mnist", "train", source="tfds")
    assert ds.images_NxHxWxC.shape == (12, 28, 28, 1) and ds.images_NxHxWxC.dtype == np.uint8
    assert ds.labels_N.dtype == np.int32 and ds.labels_N.max() < 10
    assert (ds.name, ds.num_classes, ds.split) == ("mnist", 10, "train")
    assert next(BatchIterator(ds, 4, seed=0))["image"].shape == (4, 28, 28, 1)


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'eejax\[tfds\]'"):
        tfds_source.load_tfds("mnist", "train")


def test_text_loader_resolves_the_default_data_dir(shared_data, monkeypatch):
    from eejax.data import text

    monkeypatch.setenv("EEJAX_DATA_DIR", str(shared_data))
    assert len(text.load_text(None, "tiny_shakespeare", "validation")) == 111_540
