"""The content-addressed feature cache and the batched extraction over it (a tiny fake encoder: fast)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.encoders.base import Encoder
from mmfusion.features import cache as cache_module
from mmfusion.features.cache import CacheNotWritableError, FeatureCache
from mmfusion.features.extract import extract_features
from mmfusion.modalities import ImageSpec, TextSpec
from tests.conftest import draw_sample


class CountingTextEncoder(Encoder):
    """4-d embedding from character statistics; counts how many items it really encoded."""

    name = "counting"
    modality = "text"
    dim = 4
    batch_by_length = True

    def __init__(self, scale: float = 1.0, batch_size: int = 3):
        self.scale = scale
        self.calls = 0
        super().__init__(device="cpu", batch_size=batch_size)

    @property
    def preprocessing(self):
        return {"scale": self.scale}

    def weights_files(self):
        return [Path(__file__)]

    def load_model(self):
        return torch.nn.Identity()

    def prepare(self, item):
        return item

    def collate(self, prepared):
        return prepared

    def _forward(self, batch):
        self.calls += len(batch)
        rows = [[len(t), sum(map(ord, t)) % 97, t.count(" "), self.scale] for t in batch]
        return torch.tensor(rows, dtype=torch.float32)


class MeanColourEncoder(CountingTextEncoder):
    name = "mean_colour"
    modality = "image"
    dim = 3
    batch_by_length = False
    may_truncate = False

    def prepare(self, item):
        return torch.from_numpy(np.asarray(item, dtype=np.float32).mean(axis=(0, 1)))

    def collate(self, prepared):
        return torch.stack(prepared)

    def _forward(self, batch):
        self.calls += len(batch)
        return batch


TEXTS = [f"sample text number {i}" for i in range(10)]


def make_cache(root: Path, enc: Encoder) -> FeatureCache:
    return FeatureCache(root, f"{enc.fingerprint}-{enc.precision}", enc.dim, enc.describe())


def test_second_run_is_all_hits_and_new_samples_are_the_only_misses(tmp_path):
    enc = CountingTextEncoder()
    first = extract_features(enc, TextSpec(), TEXTS, make_cache(tmp_path, enc), progress=False)
    assert first.stats["cache_hits"] == 0 and first.stats["encoded"] == 10 and enc.calls == 10

    enc.calls = 0
    again = extract_features(enc, TextSpec(), TEXTS, make_cache(tmp_path, enc), progress=False)
    assert again.stats["cache_hits"] == 10 and again.stats["encoded"] == 0 and enc.calls == 0
    np.testing.assert_array_equal(again.features, first.features)

    more = TEXTS + [f"a brand new sample {i}" for i in range(3)]
    grown = extract_features(enc, TextSpec(), more, make_cache(tmp_path, enc), progress=False)
    assert grown.stats["cache_hits"] == 10 and grown.stats["encoded"] == 3 and enc.calls == 3


def test_rows_align_with_inputs_and_duplicates_encode_once(tmp_path):
    enc = CountingTextEncoder()
    values = ["bb b", "a", "ccc cc c", "a", "A  "]  # "A  " normalises (lowercase, strip) to "a"
    res = extract_features(enc, TextSpec(lowercase=True), values, make_cache(tmp_path, enc), progress=False)
    assert res.stats["unique"] == 3 and enc.calls == 3
    np.testing.assert_array_equal(res.features[1], res.features[3])
    np.testing.assert_array_equal(res.features[1], res.features[4])
    expected = enc.encode(["bb b", "a", "ccc cc c"]).numpy()
    np.testing.assert_array_equal(res.features[[0, 1, 2]], expected)


def test_changed_fingerprint_re_encodes_and_keeps_the_old_entries(tmp_path):
    old = CountingTextEncoder(scale=1.0)
    extract_features(old, TextSpec(), TEXTS, make_cache(tmp_path, old), progress=False)
    new = CountingTextEncoder(scale=2.0)  # "preprocessing" changed -> another fingerprint
    assert new.fingerprint != old.fingerprint
    res = extract_features(new, TextSpec(), TEXTS, make_cache(tmp_path, new), progress=False)
    assert res.stats["cache_hits"] == 0 and new.calls == 10
    assert (res.features[:, 3] == 2.0).all()
    assert len(make_cache(tmp_path, old)) == 10  # the old encoder's entries are intact


def test_crash_mid_write_leaves_a_readable_cache_and_the_rerun_completes(tmp_path, monkeypatch):
    enc = CountingTextEncoder(batch_size=3)
    real_replace = os.replace
    done = {"n": 0}

    def dying_replace(src, dst):
        if str(dst).endswith(".f32"):
            if done["n"] == 4:  # the 5th entry: its temporary file is written, the process "dies" before the rename
                raise KeyboardInterrupt("killed")
            done["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        extract_features(enc, TextSpec(), TEXTS, make_cache(tmp_path, enc), progress=False)
    monkeypatch.setattr(cache_module.os, "replace", real_replace)

    cache = make_cache(tmp_path, enc)
    assert len(cache) == 4  # complete entries only
    assert not list(cache.dir.glob("*/.*.tmp"))  # the interrupted write cleaned up after itself
    for path in cache.dir.glob("*/*.f32"):
        assert path.stat().st_size == enc.dim * 4

    enc.calls = 0
    res = extract_features(enc, TextSpec(), TEXTS, cache, progress=False)
    assert res.stats["cache_hits"] == 4 and res.stats["encoded"] == 6 and enc.calls == 6
    np.testing.assert_array_equal(res.features, enc.encode(TEXTS).numpy())


def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path):
    enc = CountingTextEncoder()
    cache = make_cache(tmp_path, enc)
    extract_features(enc, TextSpec(), TEXTS[:3], cache, progress=False)
    victim = next(cache.dir.glob("*/*.f32"))
    victim.write_bytes(victim.read_bytes()[:5])  # e.g. a full disk
    res = extract_features(enc, TextSpec(), TEXTS[:3], make_cache(tmp_path, enc), progress=False)
    assert res.stats["cache_hits"] == 2 and res.stats["encoded"] == 1
    assert res.stats["corrupt_entries_replaced"] == 1
    assert victim.stat().st_size == enc.dim * 4


def test_stale_temporary_files_from_a_dead_run_are_removed(tmp_path):
    enc = CountingTextEncoder()
    cache = make_cache(tmp_path, enc)
    stale = cache.dir / "ab" / ".abc.f32.123.dead.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    make_cache(tmp_path, enc)
    assert not stale.exists()


def test_unwritable_cache_dir_is_a_clear_error_and_loses_nothing(tmp_path):
    enc = CountingTextEncoder()
    cache = make_cache(tmp_path / "good", enc)
    extract_features(enc, TextSpec(), TEXTS, cache, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # chmod is no barrier to root; a file in the path is
    with pytest.raises(CacheNotWritableError, match="not writable.*featurize.cache_dir"):
        make_cache(blocker / "cache", enc)
    assert isinstance(CacheNotWritableError("x"), PermissionError)  # the stage CLI prints it as one line
    assert len(make_cache(tmp_path / "good", enc)) == 10


def test_images_that_fail_to_load_are_reported_not_fatal(tmp_path):
    for i in range(4):
        draw_sample((200, 30, 30), seed=i).save(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    values = ["ok0.png", "bad.png", "ok1.png", "missing.png", "ok2.png", "ok3.png"]
    enc = MeanColourEncoder()
    src = ImageSpec(root=tmp_path)
    for workers in (0, 1):
        res = extract_features(enc, src, values, make_cache(tmp_path / f"c{workers}", enc), num_workers=workers, progress=False)
        assert set(res.failed) == {1, 3}
        assert res.failed[1].startswith("undecodable_image") and res.failed[3].startswith("missing_image")
        assert res.stats["encoded"] == 4 and res.stats["failed"] == 2
        assert (res.features[[0, 2, 4, 5]] > 0).all()


def test_auto_workers_decode_in_process_on_cpu_and_in_workers_on_cuda():
    from mmfusion.features.extract import resolve_workers

    assert resolve_workers(-1, torch.device("cpu")) == 0
    assert resolve_workers(-1, torch.device("cuda")) >= 1
    assert resolve_workers(3, torch.device("cpu")) == 3


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_an_fsspec_url_holds_the_same_cache(tmp_path, scheme):
    """featurize.cache_dir may be any fsspec URL (an object store on a cluster): the same hits, misses and vectors."""
    from mmfusion.features.cache import FsspecFeatureCache, open_cache

    url = f"memory://mmfusion-test-{tmp_path.name}/features" if scheme == "memory" else f"file://{tmp_path}/features"
    enc = CountingTextEncoder()
    opened = lambda: open_cache(url, f"{enc.fingerprint}-{enc.precision}", enc.dim, enc.describe())  # noqa: E731
    assert isinstance(opened(), FsspecFeatureCache)
    first = extract_features(enc, TextSpec(), TEXTS, opened(), progress=False)
    assert first.stats["encoded"] == 10 and len(opened()) == 10
    enc.calls = 0
    again = extract_features(enc, TextSpec(), TEXTS, opened(), progress=False)
    assert again.stats["cache_hits"] == 10 and enc.calls == 0
    np.testing.assert_array_equal(again.features, first.features)
    cache = opened()
    key = next(iter(cache.fs.glob(f"{cache.dir}/*/*.f32"))).rsplit("/", 1)[1].removesuffix(".f32")
    assert key in cache and cache.fs.exists(f"{cache.dir}/encoder.json")
    cache.fs.pipe_file(cache.path(key), b"short")  # a damaged entry is a miss, re-encoded
    assert key not in cache and cache.get(key) is None and cache.corrupt == 1
    if scheme == "file":
        assert (tmp_path / "features" / cache.namespace / key[:2] / f"{key}.f32").is_file()  # the local layout


def test_a_cache_folder_removed_during_a_run_is_made_again(tmp_path):
    """Folders are made once per cache instance; one deleted behind its back must not lose a write."""
    import shutil

    import numpy as np

    from mmfusion.features.cache import FeatureCache

    cache = FeatureCache(tmp_path, "enc@1", 3)
    key = "ab" + "0" * 62
    cache.put(key, np.ones(3, dtype=np.float32))
    shutil.rmtree(cache.path(key).parent)
    cache.put(key, np.full(3, 2.0, dtype=np.float32))
    assert cache.get(key).tolist() == [2.0, 2.0, 2.0]


class ThreadRecordingImageEncoder(MeanColourEncoder):
    """The real image preprocessing (resize + centre crop to uint8 CHW), per-channel means and a checksum as the
    embedding; records which thread prepared each item and which thread encoded each batch."""

    name = "thread_recording"
    dim = 4

    def __init__(self, batch_size: int = 3, fail_on: str | None = None):
        self.prepared_in: list[str] = []
        self.encoded_in: list[str] = []
        self.fail_on = fail_on
        super().__init__(batch_size=batch_size)

    def prepare(self, item):
        import threading

        from mmfusion.encoders.image import resize_center_crop

        self.prepared_in.append(threading.current_thread().name)
        if self.fail_on is not None and item.getpixel((0, 0)) == (1, 2, 3):
            raise RuntimeError(self.fail_on)  # not a decode error: the whole run must stop with it
        return resize_center_crop(item, 40)

    def collate(self, prepared):
        return torch.stack(prepared)

    def _forward(self, batch):
        import threading

        self.encoded_in.append(threading.current_thread().name)
        self.calls += len(batch)
        x = batch.float()
        return torch.cat([x.mean(dim=(2, 3)), (x * torch.arange(40.0)).sum(dim=(1, 2, 3)).unsqueeze(1) / 1e6], dim=1)


def _image_values(root: Path, n: int, bad: dict[int, str] | None = None) -> list[str]:
    values = []
    for i in range(n):
        name = f"img{i}.png"
        if bad and i in bad:
            if bad[i] == "undecodable":
                (root / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
            elif bad[i] == "marked":  # decodes; the encoder's prepare raises on it
                Image.new("RGB", (30, 20), (1, 2, 3)).save(root / name)
            else:
                name = f"missing{i}.png"
        else:
            draw_sample((40 * (i % 6), 200, 30), seed=i, size=30 + i % 7).save(root / name)
        values.append(name)
    return values


def _cache_files(cache: FeatureCache) -> dict[str, bytes]:
    return {str(p.relative_to(cache.dir)): p.read_bytes() for p in sorted(cache.dir.rglob("*")) if p.is_file()}


def test_overlapped_featurize_is_byte_identical_to_the_sequential_loop(tmp_path):
    """Decoding the next batches in a thread and writing the cache in another changes nothing: same vectors,
    same failures, same cache files byte for byte; and the work really ran off the encoding thread."""
    values = _image_values(tmp_path, 17, bad={5: "undecodable", 11: "missing"})
    values += values[:4]  # duplicates: encoded once, put back on every row
    src = ImageSpec(root=tmp_path)
    runs, files = {}, {}
    for overlap in (False, True):
        enc = ThreadRecordingImageEncoder(batch_size=3)
        cache = make_cache(tmp_path / f"cache-{overlap}", enc)
        runs[overlap] = extract_features(enc, src, values, cache, num_workers=0, progress=False, overlap=overlap)
        files[overlap] = _cache_files(cache)
        assert set(enc.encoded_in) == {"MainThread"}
        threads = set(enc.prepared_in)
        assert threads == ({"featurize-prefetch"} if overlap else {"MainThread"})
    seq, ovl = runs[False], runs[True]
    assert ovl.features.tobytes() == seq.features.tobytes()
    assert ovl.failed == seq.failed and set(ovl.failed) == {5, 11}
    assert ovl.failed[5].startswith("undecodable_image") and ovl.failed[11].startswith("missing_image")
    assert ovl.stats["encoded"] == seq.stats["encoded"] == 15
    assert files[True] == files[False] and len(files[True]) == 16  # 15 entries + encoder.json


def test_on_batch_sees_every_batch_in_order_and_the_cache_is_complete_on_return(tmp_path):
    from mmfusion.features.extract import encode_batches

    values = _image_values(tmp_path, 20, bad={7: "undecodable"})  # a decode error inside a prefetched batch
    keys = [f"{i:02d}" + "0" * 62 for i in range(20)]
    enc = ThreadRecordingImageEncoder(batch_size=4)
    cache = make_cache(tmp_path / "cache", enc)
    seen: list[str] = []
    encoded, failed = encode_batches(
        enc, ImageSpec(root=tmp_path), keys, values, cache, num_workers=0, progress=False, overlap=True,
        on_batch=lambda k, f: seen.extend(k),
    )  # fmt: skip
    assert encoded == 19 and set(failed) == {7} and failed[7].startswith("undecodable_image")
    assert seen == [k for i, k in enumerate(keys) if i != 7]
    assert len(cache) == 19 and all(k in cache for k in seen)  # written (by the writer thread) before returning


def test_an_error_in_the_prefetch_thread_stops_the_run_and_keeps_what_was_encoded(tmp_path):
    values = _image_values(tmp_path, 14, bad={9: "marked"})
    enc = ThreadRecordingImageEncoder(batch_size=3, fail_on="prepare broke")
    cache = make_cache(tmp_path / "cache", enc)
    with pytest.raises(RuntimeError, match="prepare broke"):
        extract_features(enc, ImageSpec(root=tmp_path), values, cache, num_workers=0, progress=False)
    assert "MainThread" not in enc.prepared_in
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("featurize-")]  # both threads stopped
    assert len(cache) == 9  # the three batches before the failing one are in the cache: a rerun resumes there


def test_a_cache_write_error_in_the_writer_thread_is_raised_and_leaves_complete_entries(tmp_path, monkeypatch):
    values = _image_values(tmp_path, 12)
    enc = ThreadRecordingImageEncoder(batch_size=3)
    real_replace = os.replace
    done = {"n": 0}

    def dying_replace(src, dst):
        if str(dst).endswith(".f32"):
            if done["n"] == 4:  # the 5th entry: written to its temporary file, then the write "fails"
                raise OSError(28, "No space left on device")
            done["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", dying_replace)
    with pytest.raises(OSError, match="No space left"):
        extract_features(enc, ImageSpec(root=tmp_path), values, make_cache(tmp_path / "c", enc), num_workers=0, progress=False)
    monkeypatch.setattr(cache_module.os, "replace", real_replace)
    cache = make_cache(tmp_path / "c", enc)
    assert len(cache) == 4 and not list(cache.dir.glob("*/.*.tmp"))
    enc.calls = 0
    res = extract_features(enc, ImageSpec(root=tmp_path), values, cache, num_workers=0, progress=False)
    assert res.stats["cache_hits"] == 4 and res.stats["encoded"] == 8 and enc.calls == 8
