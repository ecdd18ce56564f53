"""Offline data files: where they live and their sha256, checked before anything is parsed.

Every file eejax reads from the shared data directory is pinned in `CHECKSUMS` (values from each dataset's
README.md, re-verified by hashing). `verified_path` refuses a missing or altered file with a one-line
`DataError`, so a truncated copy fails at load time instead of as a silently worse accuracy.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

from eejax.errors import DataError

# dataset directory (as under /work/shared/data) -> file name -> sha256 of the file as stored.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10-jpeg": {
        "cifar10_jpeg.npz": "fdef8a4f8ffc8d30250e96c70293706a31eeb1af139bf284db10b42d65dca644",
    },
    "tiny-shakespeare": {
        "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
    "wikitext-2": {
        "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
    "gutenberg-books": {
        "pg11.txt": "f17aa0bf7466424a8b357b688678666bad7a0148963ef349016a3098faa6bd1e",
        "pg84.txt": "f572837d92b31a857df4f6d0612e54f4bd8003d134367ae6a35ef444b9a8336b",
        "pg174.txt": "aa8346331b9532dab86d8ab25a4a4ad598dc1c79e7ec2ed66157db9881861236",
        "pg1342.txt": "86dab871eec9c0cef97f4cb6313f86c6cc48f6f7809534e65cd3f1c1d486d247",
        "pg1661.txt": "e21895308fe6da6919abc53e2cf77d81f914887897546153cc5d49b2eadefe50",
        "pg2701.txt": "1fc8b162929e0e095ad636c6364a59cb634e5097933eb7735bf2c251f685d274",
    },
    "sst2": {
        "train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
        "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        "test-labeled.tsv": "c0efc56ade6e0598d0f8daca1976e232aee0bcabca8e599341cad290d9d10b3c",
    },
}

ENV_VAR = "EEJAX_DATA_DIR"
# <checkout>/../shared/data: the layout of the development machines (repo and shared data side by side).
_SIBLING_DATA_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"

# (resolved path, size, mtime_ns) -> sha256; an unchanged file is hashed once per process.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}




def resolve_data_dir(flag: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: `flag` (e.g. --data_dir), else $EEJAX_DATA_DIR, else ../shared/data beside the repo."""
    for candidate in (flag, os.environ.get(ENV_VAR) or None):
        if candidate is not None:
            path = pathlib.Path(candidate).expanduser()
            if not path.is_dir():
                raise DataError(f"data directory {path} does not exist")
            return path
    if _SIBLING_DATA_DIR.is_dir():
        return _SIBLING_DATA_DIR
    raise DataError(f"no data directory: pass --data_dir or set {ENV_VAR} ({_SIBLING_DATA_DIR} not found)")


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, cached per (path, size, mtime) so repeated loads do not rehash."""
    path = pathlib.Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def check_sha256(path: pathlib.Path, expected: str) -> pathlib.Path:
    """Returns `path` if it exists with the `expected` sha256, else raises a one-line DataError."""
    if not path.is_file():
        raise DataError(f"missing: {path} (expected sha256 {expected}; set --data_dir or {ENV_VAR})")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")
    return path


def verified_path(data_dir: str | os.PathLike | None, dataset: str, filename: str) -> pathlib.Path:
    """`data_dir/dataset/filename`, after checking it against `CHECKSUMS[dataset][filename]`.

    `data_dir=None` resolves as `resolve_data_dir` does (env `EEJAX_DATA_DIR`, then `../shared/data`)."""
    try:
        expected = CHECKSUMS[dataset][filename]
    except KeyError:
        raise DataError(f"no checksum pinned for {dataset}/{filename}; known datasets: {sorted(CHECKSUMS)}") from None
    return check_sha256(resolve_data_dir(data_dir) / dataset / filename, expected)
