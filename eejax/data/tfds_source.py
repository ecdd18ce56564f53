"""The online path: image datasets through TFDS for users with internet, without TensorFlow.

`tfds.data_source` reads TFDS's array_record files with random access and needs no TensorFlow (`tfds.load`
does). Install with `pip install 'eejax[tfds]'`.
"""
from __future__ import annotations

import numpy as np

from eejax.data.vision import ArrayDataset


def load_tfds(name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
              label_key: str = "label") -> ArrayDataset:
    """All examples of TFDS dataset `name` / `split` (downloaded and prepared on first use) as an ArrayDataset."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"load_tfds({name!r}) needs tensorflow-datasets: pip install 'eejax[tfds]'") from e
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    if not len(source):
        raise ValueError(f"TFDS {name}/{split} is empty")
    # Element by element: ArrayRecordDataSource.__getitems__ is not implemented for every backend (e.g. mocks).
    examples = [source[i] for i in range(len(source))]
    images_NxHxWxC = np.stack([np.asarray(ex[image_key], np.uint8) for ex in examples])
    labels_N = np.array([ex[label_key] for ex in examples], np.int32)
    if images_NxHxWxC.ndim == 3:  # grayscale datasets without a channel axis
        images_NxHxWxC = images_NxHxWxC[..., None]
    num_classes = source.dataset_info.features[label_key].num_classes
    return ArrayDataset(images_NxHxWxC, labels_N, name, num_classes, split)
