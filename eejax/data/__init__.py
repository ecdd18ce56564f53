"""Data: verified offline files, the embedded MNIST demo split, TFDS for users online, tokenizers, batching.

  ds = get_dataset("mnist_embedded", "train")                      # no files, no network
  train, val = split_train_val(get_dataset("mnist", "train"), 0.1, seed=0)
  for batch in BatchIterator(train, batch_size=128, seed=0): ...   # {"image": BxHxWxC f32, "label": B i32}
"""
from eejax.data.files import CHECKSUMS, DataError, resolve_data_dir, verified_path
from eejax.data.pipeline import (DATASETS, NORMALIZATION, BatchIterator, Normalization, TrainVal, TrainValTest,
                                 get_dataset, split_embedded, split_train_val)
from eejax.data.bpe import BPETokenizer
from eejax.data.text import ByteTokenizer, CharTokenizer, load_text, load_tokens
from eejax.data.vision import ArrayDataset, load_cifar10_jpeg, load_embedded_mnist, load_fashion_mnist, load_mnist
