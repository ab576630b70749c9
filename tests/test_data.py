"""mtdl_fast.app.data: the built-in offline image sources."""
import numpy as np
import pytest
import torch

from mtdl_fast.app import data


@pytest.fixture(scope="module")
def digits32():
    return data.load_digits()


def test_digits_shapes_dtypes_ranges(digits32):
    x, y = digits32
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert set(y.tolist()) == set(range(10))


def test_digits_labels_and_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = data.load_digits(size=8)   # no resampling: the original pixels rescaled to [0, 255]
    np.testing.assert_array_equal(y.numpy(), bunch.target)
    expected = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    np.testing.assert_array_equal(x[:, 0].numpy(), expected)


@pytest.mark.parametrize("size", [16, 28, 64])
def test_digits_sizes_are_upsampled_copies(size):
    x, y = data.load_digits(size=size)
    assert x.shape == (1797, 1, size, size) and x.dtype == torch.uint8
    x8, _ = data.load_digits(size=8)
    # Downsampling back (area) gives images strongly correlated with the 8x8 originals.
    back = torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten()
    corr = torch.corrcoef(torch.stack([back, x8.float().flatten()]))[0, 1]
    assert corr > 0.95


def test_digits_rejects_bad_size():
    with pytest.raises(ValueError):
        data.load_digits(size=0)


@pytest.mark.parametrize("size,n", [(32, 16), (64, 8), (224, 3), (427, 2), (500, 2)])
def test_sample_photos_shapes_dtypes(size, n):
    x = data.load_sample_photos(size, n)
    assert x.shape == (n, 3, size, size) and x.dtype == torch.uint8
    assert x.is_contiguous()


def test_sample_photos_are_real_photographs():
    x = data.load_sample_photos(64, 32, seed=0).float()
    # Natural images: a broad range of values, real colour, spatial correlation between neighbours.
    assert x.min() < 40 and x.max() > 215
    assert x.std() > 30
    assert (x[:, 0] - x[:, 2]).abs().mean() > 5
    dx = (x[..., 1:] - x[..., :-1]).abs().mean()
    shuffled = x.flatten(2)[..., torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))]
    assert dx < 0.5 * (shuffled[..., 1:] - shuffled[..., :-1]).abs().mean()


def test_sample_photos_tiles_are_cut_from_the_photos():
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1) for im in load_sample_images().images]
    tile = data.load_sample_photos(16, 1, seed=3)[0]
    found = False
    for p in photos:
        windows = p.unfold(1, 16, 1).unfold(2, 16, 1)   # (3, H-15, W-15, 16, 16)
        hit = (windows == tile[:, None, None]).all(dim=(0, 3, 4))
        found = found or bool(hit.any())
    assert found


def test_sample_photos_deterministic_by_seed():
    a = data.load_sample_photos(32, 10, seed=7)
    b = data.load_sample_photos(32, 10, seed=7)
    c = data.load_sample_photos(32, 10, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Tiles differ from one another within a call.
    assert len({t.numpy().tobytes() for t in a}) == 10


def test_sample_photos_bad_args():
    with pytest.raises(ValueError):
        data.load_sample_photos(0, 1)
    with pytest.raises(ValueError):
        data.load_sample_photos(8, -1)
    assert data.load_sample_photos(8, 0).shape == (0, 3, 8, 8)


def test_cifar10_missing_dir_names_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(ValueError, match="no_such_dir"):
        data.load_cifar10(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.load_cifar10(empty, train=False)


def _fake_cifar(root):
    """A tiny fake copy in torchvision's layout (pickled batches of 4 images each)."""
    import pickle

    import torchvision

    ds = torchvision.datasets.CIFAR10
    folder = root / ds.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for fname, _md5 in ds.train_list + ds.test_list:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 4).tolist()}
        with open(folder / fname, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / ds.meta["filename"], "wb") as fh:
        pickle.dump({ds.meta["key"]: [f"c{i}" for i in range(10)]}, fh)


def test_cifar10_corrupt_copy_is_a_value_error(tmp_path):
    root = tmp_path / "corrupt_cifar"
    root.mkdir()
    _fake_cifar(root)   # md5 sums do not match torchvision's: "not found or corrupted"
    with pytest.raises(ValueError, match="corrupt_cifar"):
        data.load_cifar10(root)


def test_cifar10_reads_local_copy(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    x, y = data.load_cifar10(tmp_path, train=True)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8   # 5 train batches of 4
    assert y.shape == (20,) and y.dtype == torch.int64 and int(y.max()) < 10
    xt, yt = data.load_cifar10(str(tmp_path), train=False)
    assert xt.shape == (4, 3, 32, 32) and yt.shape == (4,)
