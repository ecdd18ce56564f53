"""Rebuilds `mnist_test.npz` (the MNIST test split shipped inside the package) from the verified IDX files.

  python -m eejax.data.embedded.make_embedded [--data_dir /path/to/shared/data]

Same layout as `np.savez_compressed` (a deflated zip of .npy members), but written with a fixed timestamp so
the bytes, and hence the sha256 pinned in `eejax.data.vision.EMBEDDED_MNIST_SHA256`, are reproducible run to run.
"""
import argparse
import hashlib
import io
import pathlib
import zipfile

import numpy as np

from eejax.data import files, vision

OUT = pathlib.Path(__file__).with_name("mnist_test.npz")


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def make(data_dir, out: pathlib.Path = OUT) -> str:
    """Writes the verified MNIST test split to `out`; returns the npz's sha256."""
    test = vision.load_mnist(data_dir, "test")
    write_npz(out, {"images_NxHxW": test.images_NxHxWxC[..., 0], "labels_N": test.labels_N.astype(np.uint8)})
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    sha = make(files.resolve_data_dir(parser.parse_args().data_dir))
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes) sha256 {sha}")
    if sha != vision.EMBEDDED_MNIST_SHA256:  # e.g. a different zlib; the arrays are what the tests compare
        print(f"note: differs from the pinned {vision.EMBEDDED_MNIST_SHA256}; update vision.py and README.md")


if __name__ == "__main__":
    main()
