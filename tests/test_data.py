"""Data: long-tail profile, on-disk readers (on small files in the real formats), preprocessing, ZCA."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ltdd_fast.data import (DATASETS, ZCA, is_lt_list_form, load_dataset, long_tail_counts, long_tail_indices,
                            read_cifar, read_digits, read_imagenet_lt, read_tiny_imagenet)
from ltdd_fast.errors import ConfigError, DataError


# ---------------------------------------------------------------- writers of the real on-disk formats

def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, per_batch=20, n_test=20, seed=0):
    """cifar-10-batches-py with data_batch_1..5, test_batch, batches.meta; returns the train/test rows."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = [int(v) for v in np.arange(per_batch) % 10]  # 2 per class per batch -> 10 per class
        _dump(d / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": lab,
                                      b"data": data, b"filenames": [b"x.png"] * per_batch})
        rows.append(data)
        labels += lab
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in np.arange(n_test) % 10]
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test,
                             b"filenames": [b"x.png"] * n_test})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return np.concatenate(rows), np.asarray(labels), test, np.asarray(test_labels)


def write_cifar100(root, n_train=300, n_test=100, seed=1):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(n) % 100]
        _dump(d / name, {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                         b"coarse_labels": [v // 5 for v in fine], b"data": data})
        out += [data, np.asarray(fine)]
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return out


def smooth_image(seed, h, w):
    """A smooth colour gradient: JPEG keeps it to within a few grey levels."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0, 255, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = a + b * yy[..., None] * (60 / h) + c * xx[..., None] * (60 / w)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiny(root, wnids=("n01443537", "n01629819", "n01641577"), n_train=4, n_val=2):
    d = root / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("n00001740\tentity\n" + "\n".join(f"{w}\tname{i}, alias" for i, w in enumerate(wnids)) + "\n")
    train, val = {}, []
    for i, w in enumerate(wnids):
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(n_train):
            arr = smooth_image(100 * i + k, 64, 64)
            if i == 1 and k == 0:  # Tiny ships some grayscale JPEGs
                arr = arr[..., 0]
                Image.fromarray(arr, "L").save(img_dir / f"{w}_{k}.JPEG", quality=95)
            else:
                Image.fromarray(arr).save(img_dir / f"{w}_{k}.JPEG", quality=95)
            train[(w, k)] = arr
    lines = []
    for j in range(n_val * len(wnids)):
        w = wnids[(j * 2 + 1) % len(wnids)]  # val order is not class order
        arr = smooth_image(10_000 + j, 64, 64)
        Image.fromarray(arr).save(d / "val" / "images" / f"val_{j}.JPEG", quality=95)
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
        val.append((w, arr))
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return train, val


def centre_marked_image(h, w, colour):
    """Blue border, `colour` over the central 5/8 of the longer side: a correct centre crop shows only colour."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (0, 0, 255)
    if w >= h:
        arr[:, w * 3 // 16: w - w * 3 // 16] = colour
    else:
        arr[h * 3 // 16: h - h * 3 // 16] = colour
    return arr


def close(a, b, mean_tol=3.0, max_tol=24):
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return diff.mean() <= mean_tol and diff.max() <= max_tol


@pytest.fixture
def cifar10_dir(tmp_path):
    return tmp_path, write_cifar10(tmp_path)


# ---------------------------------------------------------------- long-tail profile

def test_published_cifar10_lt_counts():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("n_max,C,beta", [(500, 100, 100), (500, 100, 10), (5000, 10, 200), (500, 200, 50),
                                           (1300, 1000, 256), (5000, 10, 1), (7, 3, 7)])
def test_counts_follow_formula(n_max, C, beta):
    counts = long_tail_counts(n_max, C, beta)
    assert len(counts) == C and counts[0] == n_max
    for c, n in enumerate(counts):
        exact = n_max * beta ** (-c / (C - 1))
        assert n == np.floor(exact + 1e-9) and n <= exact + 1e-6 < n + 1
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_counts_exact_tail_and_edge_cases():
    assert long_tail_counts(500, 100, 100)[-1] == 5  # 500/100 is whole: float error must not drop it to 4
    assert long_tail_counts(500, 100, 50)[-1] == 10
    assert long_tail_counts(5000, 10, 1) == [5000] * 10
    assert long_tail_counts(123, 1, 100) == [123]
    with pytest.raises(ConfigError, match="imbalance_factor"):
        long_tail_counts(100, 10, 0.5)


def test_indices_seeded_and_follow_profile():
    labels = np.repeat(np.arange(5), 40)
    np.random.default_rng(3).shuffle(labels)
    a = long_tail_indices(labels, 8, seed=0)
    assert np.array_equal(a, long_tail_indices(labels, 8, seed=0))
    assert not np.array_equal(a, long_tail_indices(labels, 8, seed=1))
    assert np.all(np.diff(a) > 0)
    assert np.bincount(labels[a]).tolist() == long_tail_counts(40, 5, 8) == [40, 23, 14, 8, 5]
    b = long_tail_indices(labels, 2, seed=0, n_max=20)
    assert np.bincount(labels[b]).tolist() == long_tail_counts(20, 5, 2)


def test_indices_short_or_empty_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(DataError, match="class 1 has 3 images"):
        long_tail_indices(labels, 2, seed=0, n_max=10)
    with pytest.raises(DataError, match="class 1 has no images"):
        long_tail_indices(np.array([0, 0, 2, 2]), 1, seed=0)
    with pytest.raises(DataError, match="class 3 has no images"):
        long_tail_indices(labels, 1, seed=0, num_classes=4)
    with pytest.raises(ConfigError, match="imbalance_factor"):
        long_tail_indices(labels, 0.5, seed=0)


# ---------------------------------------------------------------- readers

def test_read_cifar10(cifar10_dir):
    root, (train_rows, train_labels, test_rows, test_labels) = cifar10_dir
    for where in (root, root / "cifar-10-batches-py"):
        x, y, xt, yt, names = read_cifar(str(where), 10)
        assert x.shape == (100, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        assert xt.shape == (20, 32, 32, 3) and names[0] == "airplane" and names[9] == "truck"
        assert np.array_equal(y, train_labels) and np.array_equal(yt, test_labels)
        # Row layout is channel-planar: R plane, then G, then B.
        assert x[7, 2, 5, 0] == train_rows[7, 2 * 32 + 5]
        assert x[7, 2, 5, 1] == train_rows[7, 1024 + 2 * 32 + 5]
        assert x[7, 2, 5, 2] == train_rows[7, 2048 + 2 * 32 + 5]
        assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(100, -1), train_rows)
        assert np.array_equal(xt.transpose(0, 3, 1, 2).reshape(20, -1), test_rows)


def test_read_cifar_protocol2_numpy_core(cifar10_dir):
    # The distributed batches are python-2 pickles naming numpy.core.multiarray (numpy 2 calls it numpy._core).
    root, (train_rows, _, _, _) = cifar10_dir
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    path.write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core", b"numpy.core"))
    x = read_cifar(str(root), 10)[0]
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(100, -1), train_rows)


def test_read_cifar100(tmp_path):
    train, train_y, test, test_y = write_cifar100(tmp_path)
    x, y, xt, yt, names = read_cifar(str(tmp_path), 100)
    assert x.shape == (300, 32, 32, 3) and xt.shape == (100, 32, 32, 3) and len(names) == 100 and names[3] == "c3"
    assert np.array_equal(y, train_y) and np.array_equal(yt, test_y)
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(300, -1), train)


def test_read_tiny_imagenet(tmp_path):
    train, val = write_tiny(tmp_path)
    x, y, xt, yt, names = read_tiny_imagenet(str(tmp_path))
    assert x.shape == (12, 64, 64, 3) and x.dtype == np.uint8 and xt.shape == (6, 64, 64, 3)
    assert names == ["name0", "name1", "name2"]
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    wnids = ["n01443537", "n01629819", "n01641577"]
    assert yt.tolist() == [wnids.index(w) for w, _ in val]
    for i, w in enumerate(wnids):
        for k in range(4):
            src = train[(w, k)]
            got = x[4 * i + k]
            if src.ndim == 2:  # grayscale file -> three equal channels
                assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
                src = np.repeat(src[..., None], 3, axis=2)
            assert close(got, src)
    assert all(close(xt[j], arr) for j, (_, arr) in enumerate(val))
    # root/tiny-imagenet-200 itself works too
    assert read_tiny_imagenet(str(tmp_path / "tiny-imagenet-200"))[0].shape == (12, 64, 64, 3)


def test_read_imagenet_lt_list_form(tmp_path):
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 2: (255, 255, 0)}
    counts = {0: 2, 1: 5, 2: 3}  # label 1 is the head, then 2, then 0
    train_lines, test_lines = [], []
    for label, n in counts.items():
        wnid = f"n0000000{label}"
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for k in range(n):
            h, w = (60, 100) if k % 2 else (90, 48)  # landscape and portrait
            Image.fromarray(centre_marked_image(h, w, colours[label])).save(
                tmp_path / "train" / wnid / f"{wnid}_{k}.JPEG", quality=95)
            train_lines.append(f"train/{wnid}/{wnid}_{k}.JPEG {label}")
        Image.fromarray(centre_marked_image(70, 70, colours[label])).save(
            tmp_path / "val" / wnid / f"ILSVRC2012_val_{label}.JPEG", quality=95)
        test_lines.append(f"val/{wnid}/ILSVRC2012_val_{label}.JPEG {label}")
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("\n".join(test_lines) + "\n")
    assert is_lt_list_form(str(tmp_path))
    x, y, xt, yt, names = read_imagenet_lt(str(tmp_path), resolution=16)
    assert x.shape == (10, 16, 16, 3) and xt.shape == (3, 16, 16, 3)
    assert names == ["n00000001", "n00000002", "n00000000"]
    assert np.bincount(y).tolist() == [5, 3, 2] and sorted(yt.tolist()) == [0, 1, 2]
    new_of_old = {1: 0, 2: 1, 0: 2}
    for img, label in zip(x, y):  # centre crop keeps only the class colour, none of the blue border
        old = [o for o, n in new_of_old.items() if n == label][0]
        assert close(img, np.broadcast_to(np.array(colours[old], np.uint8), img.shape), 6, 40)

    d = load_dataset("imagenet-lt", str(tmp_path), imbalance_factor=100, resolution=16)
    assert d.class_counts == [5, 3, 2] and d.imbalance_factor == 2.5 and d.zca is None
    assert "ignored" in d.describe()


def test_read_imagenet_lt_folder_form(tmp_path):
    for split, n in (("train", 6), ("val", 2)):
        for ci, cls in enumerate(["zebra", "ant", "moth"]):  # sorted: ant, moth, zebra
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(smooth_image(ci * 10 + k, 80, 80)).save(tmp_path / split / cls / f"{k}.JPEG", quality=95)
    assert not is_lt_list_form(str(tmp_path))
    x, y, xt, yt, names = read_imagenet_lt(str(tmp_path), resolution=80)
    assert names == ["ant", "moth", "zebra"] and x.shape == (18, 80, 80, 3) and xt.shape == (6, 80, 80, 3)
    assert y.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and yt.tolist() == [0, 0, 1, 1, 2, 2]
    assert close(x[0], smooth_image(10, 80, 80))  # ant was written with ci=1
    d = load_dataset("imagenet-lt", str(tmp_path), imbalance_factor=3, seed=0, resolution=8)
    assert d.class_counts == long_tail_counts(6, 3, 3) and d.images_train.shape[1:] == (3, 8, 8)
    assert torch.bincount(d.labels_test).tolist() == [2, 2, 2]


def test_read_digits():
    x, y, xt, yt, names = read_digits(test_per_class=50, seed=0)
    assert x.shape[1:] == (8, 8, 1) and x.dtype == np.uint8 and len(x) + len(xt) == 1797
    assert np.bincount(yt).tolist() == [50] * 10 and x.max() == 255 and x.min() == 0
    assert not np.array_equal(read_digits(seed=1)[2], xt)


# ---------------------------------------------------------------- load_dataset

def test_load_digits_long_tailed():
    d = load_dataset("digits", imbalance_factor=10, seed=0)
    n_max = d.class_counts[0]
    assert d.class_counts == long_tail_counts(n_max, 10, 10) and n_max >= 120
    assert torch.bincount(d.labels_test).tolist() == [50] * 10
    assert d.images_train.dtype == torch.float32 and d.images_train.shape[1:] == (1, 8, 8)
    assert (d.num_classes, d.channel, d.im_size, d.zca) == (10, 1, (8, 8), None)
    assert abs(d.images_train.mean().item()) < 1e-5 and abs(d.images_train.std().item() - 1) < 1e-2
    assert 0 < d.mean[0] < 1 and 0 < d.std[0] < 1
    text = d.describe()
    assert "digits" in text and "imbalance factor 10" in text and str(n_max) in text
    # denormalize undoes the normalisation: back to the stored grey levels round(k * 255 / 16) / 255
    pix = d.denormalize(d.images_train) * 255
    assert torch.allclose(pix, pix.round(), atol=1e-3)
    levels = {round(k * 255 / 16) for k in range(17)}
    assert set(pix.round().int().unique().tolist()) <= levels
    # same seed -> same subset, other seed -> other subset
    assert torch.equal(d.images_train, load_dataset("digits", imbalance_factor=10, seed=0).images_train)
    assert not torch.equal(d.images_train[:50], load_dataset("digits", imbalance_factor=10, seed=1).images_train[:50])


def test_load_digits_resolution_and_zca():
    d = load_dataset("digits", imbalance_factor=1, resolution=16, zca=True)
    assert d.images_train.shape[1:] == (1, 16, 16) and d.images_test.shape[1:] == (1, 16, 16)
    assert d.class_counts == [d.class_counts[0]] * 10 and d.zca is not None
    back = d.denormalize(d.images_train)
    assert back.min() >= 0 and back.max() <= 1 and back.shape == d.images_train.shape


def test_load_cifar10_zca_and_counts(cifar10_dir):
    root, (rows, labels, _, _) = cifar10_dir
    d = load_dataset("cifar10", str(root), imbalance_factor=2, seed=0)
    assert d.class_counts == long_tail_counts(10, 10, 2)  # only 10 per class on disk
    assert any("n_max reduced" in n for n in d.notes) and d.zca is not None
    assert d.class_names[0] == "airplane" and d.images_test.shape == (20, 3, 32, 32)
    keep = long_tail_indices(labels, 2, seed=0, n_max=10)
    original = torch.from_numpy(rows[keep].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(d.denormalize(d.images_train), original, atol=2e-3)


# ---------------------------------------------------------------- ZCA

def test_zca_round_trip_and_whitening(tmp_path):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g) + 3 * torch.eye(12)  # correlated but well-conditioned
    x = (torch.randn(4000, 12, generator=g) @ mix + 0.5).reshape(4000, 3, 2, 2)
    z = ZCA().fit(x, regularization=1e-6)
    w = z.transform(x).reshape(4000, -1).double()
    cov = torch.cov(w.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(z.inverse(z.transform(x)), x, atol=1e-4)
    # ZCA (unlike PCA whitening) keeps images close to themselves: W is symmetric
    assert torch.allclose(z.whiten, z.whiten.T, atol=1e-5)
    z2 = ZCA().fit(x, regularization=0.1)
    assert torch.allclose(z2.inverse(z2.transform(x)), x, atol=1e-4)
    torch.save({"zca": z2.state_dict()}, tmp_path / "s.pt")
    z3 = ZCA.from_state_dict(torch.load(tmp_path / "s.pt")["zca"])
    assert torch.equal(z3.transform(x[:5]), z2.transform(x[:5])) and z3.regularization == 0.1
    with pytest.raises(DataError, match="fitted on images"):
        z3.transform(torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------- errors

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown data set 'cifar11'.*digits, mnist, fashion-mnist, cifar10"):
        load_dataset("cifar11", str(tmp_path))
    with pytest.raises(ConfigError, match="imbalance_factor.*0.5"):
        load_dataset("digits", imbalance_factor=0.5)
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"CIFAR-10 data not found in .*data_batch_1\.\.5 and test_batch"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="CIFAR-100 data not found"):
        read_cifar(str(tmp_path), 100)
    with pytest.raises(DataError, match="Tiny-ImageNet data not found.*wnids.txt"):
        load_dataset("tiny", str(tmp_path))
    with pytest.raises(DataError, match="ImageNet-LT data not found.*ImageNet_LT_train.txt"):
        load_dataset("imagenet-lt", str(tmp_path))
    with pytest.raises(ConfigError, match="resolution"):
        load_dataset("digits", resolution=0)
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "tiny", "imagenet-lt")


def test_malformed_files(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    (d / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR pickle"):
        read_cifar(str(tmp_path), 10)
    _dump(d / "data_batch_3", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DataError, match=r"data_batch_3: expected uint8 data of shape \[n, 3072\]"):
        read_cifar(str(tmp_path), 10)
    _dump(d / "data_batch_3", {b"pixels": 1})
    with pytest.raises(DataError, match="lacks the keys 'data' and 'labels'"):
        read_cifar(str(tmp_path), 10)
    _dump(d / "data_batch_3", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": os.getcwd})
    with pytest.raises(DataError, match="not allowed"):  # arbitrary globals in a pickle are refused
        read_cifar(str(tmp_path), 10)

    write_tiny(tmp_path / "t")
    ann = tmp_path / "t" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text("val_0.JPEG\tn99999999\t0\t0\t63\t63\n")
    with pytest.raises(DataError, match="line 1.*wnid from wnids.txt"):
        read_tiny_imagenet(str(tmp_path / "t"))
    ann.write_text(good)
    (tmp_path / "t" / "tiny-imagenet-200" / "train" / "n01443537" / "images" / "n01443537_2.JPEG").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read image .*n01443537_2.JPEG"):
        read_tiny_imagenet(str(tmp_path / "t"))

    lt = tmp_path / "lt"
    lt.mkdir()
    (lt / "ImageNet_LT_train.txt").write_text("train/a/missing.JPEG 0\n")
    with pytest.raises(DataError, match="incomplete.*ImageNet_LT_test.txt"):
        read_imagenet_lt(str(lt))
    (lt / "ImageNet_LT_test.txt").write_text("train/a/missing.JPEG 0\n")
    with pytest.raises(DataError, match="image not found: .*missing.JPEG"):
        read_imagenet_lt(str(lt))
    (lt / "ImageNet_LT_test.txt").write_text("just-a-path\n")
    with pytest.raises(DataError, match="ImageNet_LT_test.txt line 1"):
        read_imagenet_lt(str(lt))
