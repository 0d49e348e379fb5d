"""Expert trajectories on disk: one .npy per expert ([epochs + 1, num_params]) beside a manifest.json.

Each expert file is read memory-mapped, so one snapshot loads without reading the rest of the buffer.
An expert is written to `expert_XXXXX.partial.npy` and renamed when its last epoch is flushed, so a
finished file is always whole and an interrupted run restarts at the first unfinished expert.
"""
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, TrajectoryError
from .files import read_json, write_failure, write_json_atomic

FORMAT = "ltdd-trajectories/1"
DTYPES = {"float32": np.float32, "float16": np.float16}
# Keys that must agree before new experts may be added to an existing directory.
RUN_KEYS = ("dataset", "imbalance_factor", "class_counts", "model", "num_params", "stage", "epochs", "dtype",
            "seed", "lr", "weight_decay", "momentum", "batch_size", "sam", "max_norm", "balanced", "dsa")


def _expert_path(root, index, partial=False):
    return Path(root) / f"expert_{index:05d}{'.partial' if partial else ''}.npy"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# Manifest fields every reader relies on, and the types they must have.
_MANIFEST_TYPES = {"epochs": int, "num_params": int, "num_experts": int, "stage": int, "width": int, "dtype": str,
                   "model": str, "experts": dict}


class TrajectoryWriter:
    """Writes one expert's snapshots epoch by epoch; `finish()` makes the file visible as complete.

    The whole file is allocated on disk first, so a full disk is one error here and never a SIGBUS while
    writing into the memory map.
    """

    def __init__(self, root, index, num_snapshots, num_params, dtype):
        self.final = _expert_path(root, index)
        self.partial = _expert_path(root, index, partial=True)
        need = num_snapshots * num_params * np.dtype(DTYPES[dtype]).itemsize
        try:
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=DTYPES[dtype],
                                                   shape=(num_snapshots, num_params))
            with open(self.partial, "r+b") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(self.partial))
        except OSError as exc:
            self.array = None
            self.partial.unlink(missing_ok=True)
            raise write_failure(self.partial, exc) or exc from None
        except ValueError as exc:  # numpy refuses a size it cannot map
            self.partial.unlink(missing_ok=True)
            raise TrajectoryError(f"cannot store an expert of {num_snapshots} x {num_params} values ({need} bytes) "
                                  f"in {self.partial}: {exc}") from None
        self.next = 0

    def append(self, flat: torch.Tensor):
        self.array[self.next] = flat.detach().to("cpu", torch.float32).numpy()
        self.array.flush()
        self.next += 1

    def finish(self, commit=None):
        """Flush the file; call commit(sha256 of the file) (e.g. to record it in the manifest); then rename it
        complete. A kill between the two leaves a partial file that a rerun trains again, never a complete file
        without its record."""
        if self.next != self.array.shape[0]:
            raise RuntimeError(f"expert has {self.next} of {self.array.shape[0]} snapshots")
        self.array.flush()
        del self.array
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        if commit is not None:
            commit(file_sha256(self.partial))
        os.replace(self.partial, self.final)


class TrajectoryStore:
    """A directory of expert trajectories: `manifest` (dict) and memory-mapped access per snapshot."""

    def __init__(self, root):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise TrajectoryError(f"no expert trajectories in {self.root}: expected manifest.json "
                                  f"(written by `ltdd experts --out {self.root}`)")
        try:
            self.manifest = read_json(manifest_path, "trajectory manifest")
        except DataError as exc:
            raise TrajectoryError(str(exc)) from None
        if self.manifest.get("format") != FORMAT:
            raise TrajectoryError(f"{manifest_path} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        for key, kind in _MANIFEST_TYPES.items():
            value = self.manifest.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
                want = "a positive integer" if kind is int else f"a JSON {'object' if kind is dict else 'string'}"
                raise TrajectoryError(f"{manifest_path} is damaged: {key} is {value!r}, expected {want}")
        if self.manifest["dtype"] not in DTYPES:
            raise TrajectoryError(f"{manifest_path} is damaged: dtype {self.manifest['dtype']!r}, expected one of "
                                  f"{', '.join(DTYPES)}")
        self._cache = {}

    @property
    def num_snapshots(self):
        return self.manifest["epochs"] + 1

    def completed(self):
        """Indices of the experts whose files are complete, in order."""
        return [i for i in range(self.manifest["num_experts"]) if _expert_path(self.root, i).is_file()]

    def __len__(self):
        return len(self.completed())

    def trajectory(self, index) -> np.ndarray:
        """The memory-mapped [epochs + 1, num_params] array of one expert (checked against the manifest)."""
        if index not in self._cache:
            path = _expert_path(self.root, index)
            if not path.is_file():
                raise TrajectoryError(f"expert {index} is missing in {self.root}: expected {path.name} "
                                      f"({len(self)} complete experts)")
            want = (self.num_snapshots, self.manifest["num_params"])
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise TrajectoryError(f"{path} is truncated or corrupt ({exc}); expected a {want} "
                                      f"{self.manifest['dtype']} array") from None
            if array.shape != want or array.dtype != DTYPES[self.manifest["dtype"]]:
                raise TrajectoryError(f"{path} holds a {array.shape} {array.dtype} array, expected {want} "
                                      f"{self.manifest['dtype']} as its manifest says")
            self.verify(index)
            self._cache[index] = array
        return self._cache[index]

    def verify(self, index):
        """Check expert `index`'s file against the sha256 its manifest records (files of older runs have none)."""
        record = self.manifest["experts"].get(str(index))
        want = record.get("sha256") if isinstance(record, dict) else None
        path = _expert_path(self.root, index)
        if want is not None and file_sha256(path) != want:
            raise TrajectoryError(f"{path} is damaged: its sha256 differs from the one manifest.json recorded when "
                                  f"it was written; delete it and rerun `ltdd experts` to train it again")

    def snapshot(self, index, epoch, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """theta of expert `index` after `epoch` epochs (0 = its initialisation)."""
        if not 0 <= epoch < self.num_snapshots:
            raise TrajectoryError(f"epoch {epoch} is outside expert trajectories of {self.num_snapshots - 1} epochs")
        row = np.array(self.trajectory(index)[epoch])  # copies one row out of the map
        if not np.isfinite(row).all():
            raise TrajectoryError(f"{_expert_path(self.root, index)} holds non-finite values at epoch {epoch}: the "
                                  f"expert diverged or the file is damaged")
        return torch.from_numpy(row).to(device=device, dtype=dtype)

    def check_compatible(self, dataset, net):
        """Refuse trajectories trained on other data or another network, naming the first mismatch."""
        m = self.manifest
        expected = {
            "dataset": dataset.name,
            "imbalance_factor": float(dataset.imbalance_factor),
            "class_counts": list(dataset.class_counts),
            "num_classes": dataset.num_classes,
            "channel": dataset.channel,
            "im_size": list(dataset.im_size),
            "zca": dataset.zca is not None,
            "model": net.name,
            "num_params": net.num_params,
            "classifier_offset": net.classifier_offset,
        }
        for key, want in expected.items():
            if m.get(key) != want:
                raise TrajectoryError(f"trajectories in {self.root} do not match: {key} is {m.get(key)!r} there, "
                                      f"expected {want!r} for this run")


def convert_store(source, dest, dtype) -> "TrajectoryStore":
    """A copy of the trajectories in `source`, stored as `dtype` (e.g. float16: half the disk and reads).

    Rounding a float32 store gives what `ltdd experts --dtype float16` would have stored for stage 1, whose
    training runs in float32 whatever it stores. An interrupted copy continues at its first unfinished expert;
    an existing `dest` must be a copy of the same run in the same dtype.
    """
    if dtype not in DTYPES:
        raise TrajectoryError(f"unknown trajectory dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = TrajectoryStore(source)
    manifest = dict(src.manifest, dtype=dtype, converted_from=str(src.root.resolve()))
    dest = Path(dest)
    if (dest / "manifest.json").is_file():
        old = TrajectoryStore(dest).manifest
        for key in RUN_KEYS + ("converted_from",):
            if old.get(key) != manifest.get(key):
                raise TrajectoryError(f"{dest} already holds other trajectories ({key} is {old.get(key)!r} there, "
                                      f"{manifest.get(key)!r} for a {dtype} copy of {src.root}): use another directory")
    manifest["experts"] = {k: {f: v for f, v in e.items() if f != "sha256"} for k, e in manifest["experts"].items()}
    if (dest / "manifest.json").is_file():
        manifest["experts"].update(TrajectoryStore(dest).manifest["experts"])
    write_json_atomic(dest / "manifest.json", manifest)
    done = set(TrajectoryStore(dest).completed())
    for index in src.completed():
        if index in done:
            continue
        rows = src.trajectory(index)
        writer = TrajectoryWriter(dest, index, rows.shape[0], rows.shape[1], dtype)
        for row in rows:
            writer.append(torch.from_numpy(np.array(row, dtype=np.float32)))

        def commit(digest, key=str(index)):
            manifest["experts"][key] = {**manifest["experts"].get(key, {}), "sha256": digest}
            write_json_atomic(dest / "manifest.json", manifest)

        writer.finish(commit)
    return TrajectoryStore(dest)
