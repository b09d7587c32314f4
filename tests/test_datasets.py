"""Fashion-MNIST / MNIST (IDX files), the user's own arrays (.npz), seeded subsets, width flips.

The IDX fixtures are written byte by byte here (big-endian header, then the values), not by the
package, so a reader that misparses the format cannot agree with a writer that shares its bug.
The bad-input tests back the "Datasets" rows of docs/errors.md.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, one_line_error, run_cli, tree_digest
from datamodels.config import DataConfig, load_config
from datamodels.data import FASHION_MNIST_ROOT, load_dataset, read_idx
from datamodels.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "pipelines" / "fashion-mnist-small.yaml")
# the tiny training recipe of the other tests, on 28x28 images; every stage tiny, no Ray
TINY_28 = [s for s in TINY if not s.startswith(("name=", "data."))] + [
    "name=tiny28", "data.train_size=null", "data.test_size=null", "resources.executor=local",
    "collect.models=16", "fit.min_models=4", "fit.val_fraction=0.2", "fit.n_lambdas=5", "eval.masks=3", "eval.repeats=1", "brittleness.full_models=1",
    "verify.targets=1", "verify.models=1", "verify.rounds=1"]


def idx_bytes(a: np.ndarray) -> bytes:
    """``a`` (uint8) in the IDX format: 0, 0, type 0x08, ndim, then each size as a big-endian uint32."""
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def tiny_images(n: int, seed: int, k: int = 10, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(n, side, side) uint8 grey images whose class shows as a bright bar at a class-dependent
    row, plus noise; labels (n,) uint8 with every class present."""
    g = np.random.default_rng(seed)
    y = (np.arange(n) % k).astype(np.uint8)
    g.shuffle(y)
    x = g.integers(0, 60, (n, side, side)).astype(np.uint8)
    for i, c in enumerate(y):
        r = 2 + int(c) * (side - 4) // k
        x[i, r : r + 2, 3 : side - 3] = 230
    return x, y


def write_idx_dir(d: Path, train=(96, 0), test=(40, 1), *, gz: bool = True) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST/MNIST files in ``d`` (gzipped or raw); returns the arrays written."""
    d.mkdir(parents=True, exist_ok=True)
    (tx, ty), (sx, sy) = tiny_images(*train), tiny_images(*test)
    arrays = {"train-images-idx3-ubyte": tx, "train-labels-idx1-ubyte": ty,
              "t10k-images-idx3-ubyte": sx, "t10k-labels-idx1-ubyte": sy}
    for name, a in arrays.items():
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (d / name).write_bytes(idx_bytes(a))
    return arrays


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_files_read_exactly_gzipped_or_not(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz=gz)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path), train_size=None))
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (96, 1, 28, 28) and ds.test_x.shape == (40, 1, 28, 28)
    assert np.array_equal(ds.train_x.numpy()[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.test_x.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.flippable
    assert ds.split["files"]["train_x"] == "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert ds.split["train_indices"] is None and ds.split["test_indices"] is None
    # mean and std are exact: the same as a float64 pass over the images
    xf = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert ds.mean[0] == pytest.approx(xf.mean(), rel=1e-12) and ds.std[0] == pytest.approx(xf.std(ddof=1), rel=1e-12)
    m = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), train_size=None))
    assert m.fingerprint() == ds.fingerprint() and m.classes == tuple("0123456789") and not m.flippable


def test_read_idx_known_bytes(tmp_path):
    p = tmp_path / "a"
    # 2 x 3 x 4 values 0..23, header written out by hand
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + bytes(range(24)))
    assert np.array_equal(read_idx(p, dims=3), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 1, 0]) + bytes(256 * [7]))  # 256 labels: a size past one byte
    assert read_idx(p, dims=1).shape == (256,)


def test_subsets_are_seeded_nested_recorded_and_independent(tmp_path):
    write_idx_dir(tmp_path, train=(200, 0), test=(60, 1))
    full = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), train_size=None))

    def load(**kw):
        return load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), **kw))

    a, b = load(train_size=50, test_size=20), load(train_size=50, test_size=20)
    assert a.fingerprint() == b.fingerprint() and a.num_train == 50 and a.num_test == 20
    tr, te = a.split["train_indices"], a.split["test_indices"]
    assert tr == sorted(set(tr)) and len(tr) == 50 and a.split["split_seed"] == 0
    # the recorded indices reproduce the arrays
    assert torch.equal(full.train_x[tr], a.train_x) and torch.equal(full.test_y[te], a.test_y)
    assert set(load(train_size=20).split["train_indices"]) < set(tr)  # nested: a smaller subset is inside
    assert load(train_size=50).split["train_indices"] == tr  # the training subset ignores test_size
    assert load(train_size=50, split_seed=1).split["train_indices"] != tr
    assert load(train_size=200).split["train_indices"] is None  # all of them: nothing to record
    with pytest.raises(DataError, match=r"data.train_size: expected at most the 200 mnist training images, got 201"):
        load(train_size=201)
    with pytest.raises(DataError, match=r"data.test_size: expected at most the 60 mnist test images, got 61"):
        load(train_size=None, test_size=61)


def test_digits_and_synthetic_keep_their_own_rules():
    plain = load_dataset(DataConfig())
    assert "test_size" not in plain.split  # digits' split record is unchanged unless test_size is set
    sub = load_dataset(DataConfig(test_size=100))
    assert sub.num_test == 100 and set(sub.split["test_indices"]) < set(plain.split["test_indices"])
    assert torch.equal(sub.train_x, plain.train_x)
    with pytest.raises(DataError, match="digits has no separate test set"):
        load_dataset(DataConfig(train_size=None))
    with pytest.raises(DataError, match="synthetic_test"):
        load_dataset(DataConfig(dataset="synthetic", synthetic_train=8, synthetic_test=4, test_size=2))


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason=f"no Fashion-MNIST in {FASHION_MNIST_ROOT}")
def test_real_fashion_mnist_from_the_debian_package():
    ds = load_dataset(DataConfig(dataset="fashion-mnist", train_size=None))
    assert (ds.num_train, ds.num_test, ds.num_classes) == (60000, 10000, 10)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train_y.numpy()).tolist() == [6000] * 10
    assert np.bincount(ds.test_y.numpy()).tolist() == [1000] * 10
    # the published first labels: ankle boot, T-shirt, T-shirt, dress, T-shirt / ankle boot, pullover, ...
    assert ds.train_y[:5].tolist() == [9, 0, 0, 3, 0] and ds.test_y[:5].tolist() == [9, 2, 1, 1, 6]
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4) and ds.std[0] == pytest.approx(0.3530, abs=1e-4)
    small = load_dataset(load_config(SMALL).data)
    assert (small.num_train, small.num_test) == (2000, 1000) and len(small.split["train_indices"]) == 2000


def test_fashion_mnist_pipelines_name_the_whole_set_and_the_small_subset():
    big = load_config(ROOT / "pipelines" / "fashion-mnist.yaml")
    assert big.data.dataset == "fashion-mnist" and big.data.root is None  # the Debian path
    assert (big.data.train_size, big.data.test_size, big.collect.alpha) == (None, None, 0.5)
    small = load_config(SMALL)
    assert (small.data.train_size, small.data.test_size) == (2000, 1000)
    assert small.model.widths == (8, 16, 32, 64) and small.resources.executor == "ray"


def test_missing_directories_say_what_to_install_or_set(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*or set data.root"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"data.root: expected the directory of MNIST's IDX files .* got null"):
        load_dataset(DataConfig(dataset="mnist"))
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


def _damage_idx(d: Path, how: str) -> tuple[str, str]:
    """Damage the IDX fixture in ``d`` one way; return (file named, words the message must hold)."""
    ti, tl = d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz"
    x, y = tiny_images(96, 0)
    if how == "wrong-magic":  # a labels file where the images should be
        ti.write_bytes(gzip.compress(idx_bytes(y)))
        return ti.name, "wrong magic number 0x00000801, expected 0x00000803"
    if how == "truncated":  # a whole gzip stream of an IDX file cut short
        ti.write_bytes(gzip.compress(idx_bytes(x)[:-100]))
        return ti.name, "truncated or mislabelled: its header says 96 x 28 x 28 = 75264 values, the file holds 75164"
    if how == "truncated-gzip":  # the .gz file itself cut short (an interrupted copy)
        ti.write_bytes(ti.read_bytes()[:-500])
        return ti.name, "the gzip stream cannot be read"
    if how == "truncated-raw":
        ti.unlink()
        (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(x)[:5000])
        return "train-images-idx3-ubyte", "the file holds 4984 of them"
    if how == "count-mismatch":
        tl.write_bytes(gzip.compress(idx_bytes(y[:95])))
        return tl.name, "95 labels for the 96 images of train-images-idx3-ubyte.gz: expected one label per image"
    if how == "label-range":
        y = y.copy()
        y[7] = 10
        tl.write_bytes(gzip.compress(idx_bytes(y)))
        return tl.name, "label 10 at index 7 is outside [0, 10)"
    raise ValueError(how)


IDX_DAMAGE = ["wrong-magic", "truncated", "truncated-gzip", "truncated-raw", "count-mismatch", "label-range"]


@pytest.mark.parametrize("how", IDX_DAMAGE)
def test_bad_idx_files_exit_2_naming_the_file_and_write_nothing(tmp_path, capsys, how):
    data = tmp_path / "data"
    write_idx_dir(data)
    name, words = _damage_idx(data, how)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", SMALL, "--out", out, "--no-progress",
                           *sets(*TINY_28, f"data.root={data}"))
    line = one_line_error(err)
    assert code == 2 and str(data / name) in line and words in line, line
    assert not out.exists()


def test_data_damaged_after_a_run_leaves_its_store_byte_identical(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    write_idx_dir(data)
    args = ["train", SMALL, "--out", out, "--no-progress", *sets(*TINY_28, f"data.root={data}", "collect.models=4")]
    assert run_cli(capsys, *args)[0] == 0
    before = tree_digest(out)
    _damage_idx(data, "wrong-magic")
    code, _, err = run_cli(capsys, *args[:-1], "collect.models=8")
    assert code == 2 and "wrong magic number" in one_line_error(err)
    assert tree_digest(out) == before


def test_idx_pipeline_end_to_end_with_pictures(tmp_path, capsys):
    """The main job on a 28x28 grey IDX fixture (the small Fashion-MNIST pipeline with tiny
    settings): train, fit, LDS, brittleness, a verified search; then a query with pictures."""
    data, out = tmp_path / "data", tmp_path / "run"
    write_idx_dir(data, train=(96, 0), test=(24, 1))
    code, stdout, err = run_cli(capsys, "run", SMALL, "--out", out, "--no-progress",
                                *sets(*TINY_28, f"data.root={data}"))
    assert code == 0, err
    assert "16/16 complete" in stdout and "LDS" in stdout and "summary" in stdout
    from datamodels.fit import load_datamodels
    from datamodels.store import RunStore

    store = RunStore.open(out)
    assert store.group.attrs["dataset"]["name"] == "fashion-mnist"
    assert store.group.attrs["dataset"]["image_shape"] == [1, 28, 28]
    assert load_datamodels(store)[0].shape == (96, 24)
    code, stdout, err = run_cli(capsys, "query", out, "0", "--plot", tmp_path / "q.png")
    assert code == 0, err
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- npz


def write_npz(path: Path, layout: str = "nhw", *, classes=None, **replace) -> dict[str, np.ndarray]:
    """A tiny .npz of 28x28 images in ``layout`` (nhw grey, nchw or nhwc with 3 channels)."""
    (tx, ty), (sx, sy) = tiny_images(64, 2), tiny_images(20, 3)
    if layout != "nhw":
        tx, sx = (np.stack([a, 255 - a, a // 2], axis=1 if layout == "nchw" else 3) for a in (tx, sx))
    arrays = {"x_train": tx, "y_train": ty.astype(np.int64), "x_test": sx, "y_test": sy.astype(np.int32)}
    if classes is not None:
        arrays["classes"] = classes
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_npz_layouts_are_detected_and_read_as_nchw(tmp_path, layout):
    p = tmp_path / "mine.npz"
    a = write_npz(p, layout)
    ds = load_dataset(DataConfig(dataset="npz", root=str(p), train_size=None))
    x = a["x_train"]
    want = x[:, None] if layout == "nhw" else x if layout == "nchw" else x.transpose(0, 3, 1, 2)
    assert ds.train_x.is_contiguous() and np.array_equal(ds.train_x.numpy(), want)
    assert np.array_equal(ds.test_y.numpy(), a["y_test"]) and ds.classes == tuple("0123456789")
    assert not ds.flippable and ds.split["layout"] == layout
    assert load_dataset(DataConfig(dataset="npz", root=str(p), train_size=None, flippable=True)).flippable
    sub = load_dataset(DataConfig(dataset="npz", root=str(p), train_size=16, test_size=8))
    assert torch.equal(sub.train_x, ds.train_x[sub.split["train_indices"]]) and sub.num_test == 8


def test_npz_class_names_and_explicit_layout(tmp_path):
    p = tmp_path / "named.npz"
    write_npz(p, classes=np.array([f"c{i}" for i in range(12)]))
    ds = load_dataset(DataConfig(dataset="npz", root=str(p), train_size=None))
    assert ds.num_classes == 12 and ds.classes[11] == "c11"
    # (N, 4, 28, 4): a channel axis could be 1 or 3 -> ambiguous until data.layout says which
    q = tmp_path / "amb.npz"
    g = np.random.default_rng(0)
    write_npz(q, x_train=g.integers(0, 255, (64, 4, 28, 4), dtype=np.uint8),
              x_test=g.integers(0, 255, (20, 4, 28, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"x_train: cannot tell the channel axis of shape \(64, 4, 28, 4\).*data.layout"):
        load_dataset(DataConfig(dataset="npz", root=str(q), train_size=None))
    with pytest.raises(DataError, match=r"images of 28x4 .*expected at least 8x8"):
        load_dataset(DataConfig(dataset="npz", root=str(q), train_size=None, layout="nchw"))


NPZ_DAMAGE = {
    "wrong-dtype": (dict(x_train=tiny_images(64, 2)[0].astype(np.float32) / 255),
                    "x_train: expected uint8 images (0..255), got dtype float32"),
    "wrong-shape": (dict(x_test=np.zeros((20, 784), np.uint8)),
                    "x_test: expected images (N, H, W) grey, (N, C, H, W) or (N, H, W, C), got shape (20, 784)"),
    "test-shape": (dict(x_test=np.zeros((20, 32, 32), np.uint8)),
                   "x_test: images of shape (1, 32, 32) (C, H, W), x_train's are (1, 28, 28): expected one shape"),
    "label-range": (dict(y_test=np.full(20, 10), classes=np.array(list("abcdefghij"))),
                    "y_test: label 10 at index 0 is outside [0, 10) (20 such labels)"),
    "negative-label": (dict(y_train=-np.ones(64, np.int64)), "y_train: label -1 at index 0 is outside [0, "),
    "float-labels": (dict(y_train=np.zeros(64, np.float32)),
                     "y_train: expected integer class indices of shape (64,), got dtype float32"),
    "count-mismatch": (dict(y_train=np.zeros(63, np.int64)),
                       "y_train: 63 labels for the 64 images of x_train: expected one label per image"),
    "missing-array": (dict(y_test=None), "no array 'y_test' (found: x_test, x_train, y_train)"),
    "pickled-classes": (dict(classes=np.array(["a", 1], dtype=object)),
                        "array 'classes' holds Python objects, which are not read"),
}


@pytest.mark.parametrize("how", list(NPZ_DAMAGE))
def test_bad_npz_exits_2_naming_the_file_and_array_and_writes_nothing(tmp_path, capsys, how):
    replace, words = NPZ_DAMAGE[how]
    p = tmp_path / "mine.npz"
    write_npz(p, **replace)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", SMALL, "--out", out, "--no-progress",
                           *sets(*TINY_28, "data.dataset=npz", f"data.root={p}"))
    line = one_line_error(err)
    assert code == 2 and f"{p}: " in line and words in line, line
    assert not out.exists()


def test_npz_that_is_not_an_npz(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DataError, match=r"x.npz: not an .npz file"):
        load_dataset(DataConfig(dataset="npz", root=str(p)))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"one.npy: holds one array \(.npy\)"):
        load_dataset(DataConfig(dataset="npz", root=str(tmp_path / "one.npy")))
    with pytest.raises(DataError, match=r"data.root: .* does not exist"):
        load_dataset(DataConfig(dataset="npz", root=str(tmp_path / "none.npz")))


def test_npz_pipeline_trains_and_fits(tmp_path, capsys, caplog):
    p, out = tmp_path / "rgb.npz", tmp_path / "run"
    write_npz(p, "nhwc")
    code, stdout, err = run_cli(capsys, "train", SMALL, "--out", out, "--no-progress",
                                *sets(*TINY_28, "data.dataset=npz", f"data.root={p}", "train.flip=true"))
    assert code == 0 and "16/16 complete" in stdout, err
    assert "npz says width flips change its labels (data.flippable), so no image is flipped" in caplog.text
    code, stdout, err = run_cli(capsys, "fit", out, "--no-progress")
    assert code == 0 and "fit ridge: 16 models" in stdout, err
    from datamodels.fit import load_datamodels

    assert load_datamodels(out)[0].shape == (64, 20)


# --------------------------------------------------------------------------- flips


def test_width_flips_only_where_the_dataset_allows_them(tmp_path):
    """Training with train.flip on data that is not flippable is training without it, bit for
    bit; data.flippable=true turns the flips on."""
    from datamodels.specs import ModelSpec, Subset, train_spec

    p = tmp_path / "mine.npz"
    write_npz(p)
    spec = ModelSpec(key=(0,), seed=3, subset=Subset.all_but([]), outputs=("test_margins",))

    def margins(*extra):
        cfg = load_config(SMALL, TINY_28 + ["data.dataset=npz", f"data.root={p}", *extra])
        return train_spec(load_dataset(cfg.data), cfg, spec)["test_margins"]

    plain = margins("train.flip=false")
    assert np.array_equal(margins("train.flip=true"), plain)
    assert not np.array_equal(margins("train.flip=true", "data.flippable=true"), plain)


# --------------------------------------------------------------------------- docs


def test_errors_doc_dataset_rows_each_name_a_test_here():
    text = (ROOT / "docs" / "errors.md").read_text().split("## Datasets", 1)[1]
    rows = [ln for ln in text.splitlines() if re.match(r"\| D\d+ \|", ln)]
    assert len(rows) >= 10
    here = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    for row in rows:
        named = set(re.findall(r"`(test_\w+)", row))
        assert named and named <= here, row
