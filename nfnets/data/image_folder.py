"""A class-per-folder image dataset (`root/<class>/<image>`) read with tf.data.

Batches follow `arrays.TrainIterator` exactly (epoch permutations, per-process
contiguous slices, (epoch, batch) state); augmentation is seeded per example
from (seed, epoch, file index), so a global batch's pixels do not depend on
the number of processes and a resumed run matches an uninterrupted one.

Unreadable files are dropped once, at listing time (checked with PIL), not
while decoding: skipping inside tf.data (`ignore_errors`) would shift every
later batch and break exact resumption and process independence.

Only this module imports TensorFlow, inside functions, so the trainer, models
and digits data never need it.
"""

from __future__ import annotations

from concurrent import futures
import os
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image

from nfnets.data import arrays
from nfnets.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The train/val split of a folder without split sub-folders is fixed, not
# config.seed, so that runs with different seeds evaluate on the same images.
SPLIT_SEED = 0


def _is_readable_image(path: str) -> bool:
  """Whether PIL can parse `path`'s header and structure (no full decode)."""
  try:
    with Image.open(path) as image:
      image.verify()
    return True
  except Exception:  # pylint: disable=broad-except
    return False  # PIL raises many types for bad files; all mean unusable.


def _images_in(folder: str) -> list[str]:
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
  return [p for p in paths
          if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p)]


def _class_names(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, n)))


def list_image_folder(
    root: str, split: str, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], np.ndarray, list[str]]:
  """(paths, labels, class_names) of `list_with_skipped`; see there."""
  return list_with_skipped(root, split, val_fraction, seed)[:3]


def list_with_skipped(
    root: str, split: str, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], np.ndarray, list[str], int]:
  """Lists the readable images of one split of a class-per-folder dataset.

  If `root/train` and `root/val` both exist they are the splits and hold the
  class folders. Otherwise the class folders are `root`'s sub-folders and each
  class is split deterministically: a seeded shuffle of its sorted files puts
  `round(val_fraction * n)` of them in 'val' and the rest in 'train'.

  Args:
    root: the dataset folder.
    split: 'train' or 'val'.
    val_fraction: share of each class held out without split folders.
    seed: seed of the per-class split.

  Returns:
    (paths, labels int32 [n], class_names, skipped), sorted by class then
    name; `skipped` counts image-named files PIL cannot read (left out, one
    warning).

  Raises:
    ValueError: for a missing root, a bad split or fraction, no class folders
      or no readable images.
  """
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if not root or not os.path.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist")
  by_folder = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val"))
  class_root = os.path.join(root, split) if by_folder else root
  class_names = _class_names(class_root)
  if not class_names:
    raise ValueError(f"no class sub-folders in {class_root!r}")
  if by_folder:
    # Both splits must agree on the label of each class name.
    class_names = sorted(set(class_names) |
                         set(_class_names(os.path.join(root, "train"))))
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(class_root, name)
    files = _images_in(folder) if os.path.isdir(folder) else []
    if not by_folder:
      rng = np.random.default_rng([seed, label])
      order = rng.permutation(len(files))
      num_val = int(round(val_fraction * len(files)))
      chosen = order[:num_val] if split == "val" else order[num_val:]
      files = [files[i] for i in sorted(chosen)]
    paths.extend(files)
    labels.extend([label] * len(files))
  # Threads: verification is mostly file I/O, which releases the GIL.
  with futures.ThreadPoolExecutor(max_workers=16) as pool:
    readable = list(pool.map(_is_readable_image, paths))
  skipped = readable.count(False)
  if skipped:
    bad = [p for p, ok in zip(paths, readable) if not ok]
    logging.warning("Skipping %d unreadable image file(s) in %s (split %s), "
                    "e.g. %s", skipped, class_root, split, bad[0])
  paths = [p for p, ok in zip(paths, readable) if ok]
  labels = [y for y, ok in zip(labels, readable) if ok]
  if not paths:
    raise ValueError(f"no readable images for split {split!r} in {root!r}")
  return paths, np.asarray(labels, np.int32), class_names, skipped


def _decode_rgb(path):
  """Reads any supported image file as uint8 [h, w, 3]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  raw = tf.io.read_file(path)
  # decode_image's JPEG path uses the fast integer IDCT, 1.5 grey levels off
  # PIL on average; the accurate one decodes JPEGs bit-identically to PIL.
  # PIL's verify() does not decode JPEG data, so a truncated JPEG passes the
  # listing check: recover its decoded rows (the rest is filled) rather than
  # fail mid-epoch.
  image = tf.cond(
      tf.io.is_jpeg(raw),
      lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE",
                                try_recover_truncated=True,
                                acceptable_fraction=0.0),
      lambda: tf.io.decode_image(raw, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def _normalize(image):
  """Float pixels on the 0-255 scale -> (x - mean) / std."""
  return ((image - np.asarray(transforms.MEAN_RGB, np.float32)) /
          np.asarray(transforms.STDDEV_RGB, np.float32))


def _train_example(path, label, seed, image_size: int):
  """Inception-style random crop, random flip, bilinear resize, normalise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = _decode_rgb(path)
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed, min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear")
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _normalize(image), label


def _eval_example(path, label, image_size: int):
  """`transforms.resize_crop_32` in TF: squash-resize, centre crop, normalise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = _decode_rgb(path)
  resized = tf.image.resize(image, [image_size + 32, image_size + 32],
                            method="bicubic", antialias=True)
  # Antialiased bicubic, rounded to uint8 levels, is PIL's BICUBIC to within
  # one grey level (tests/test_image_folder.py); without antialias, 22 levels.
  resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
  cropped = resized[16:16 + image_size, 16:16 + image_size]
  return _normalize(cropped), label


class ImageFolderTrainIterator(arrays.TrainIterator):
  """Infinite, shuffled, resumable per-process batches decoded by tf.data.

  Reuses `arrays.TrainIterator`'s batch arithmetic and state; instead of
  indexing arrays it streams the files of this process's slices of the rest
  of the current epoch through one prefetching tf.data pipeline, rebuilt at
  each epoch and after `set_state`. `skipped` counts unreadable files left
  out at listing time (set by `train_iterator_from_config`).
  """

  def __init__(self, paths: Sequence[str], labels: np.ndarray,
               global_batch_size: int, *, image_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    """Initialises the iterator at the start of epoch 0.

    Args:
      paths: [n] readable image files.
      labels: [n] integer labels.
      global_batch_size: examples per step summed over all processes.
      image_size: output resolution.
      seed: seed for shuffling and augmentation.
      process_index: index of this process in [0, process_count).
      process_count: number of processes sharing each global batch.
    """
    # The parent only needs an array with the example count for its checks.
    index = np.arange(len(paths)).reshape(-1, 1, 1, 1)
    super().__init__(index, labels, global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    self._paths = np.asarray(paths, dtype=object)
    self._image_size = int(image_size)
    self._stream = None
    self._stream_at = None  # (epoch, batch) the stream yields next.
    self.skipped = 0

  def _open_stream(self, epoch: int, batch: int) -> Iterator[Any]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    perm = self._permutation(epoch)
    steps = self.steps_per_epoch
    starts = (np.arange(batch, steps) * self._global_batch +
              self._process_index * self._local_batch)
    idx = (starts[:, None] + np.arange(self._local_batch)).reshape(-1)
    files = perm[idx]
    # One seed pair per (epoch, file): independent of process count/position.
    seeds = np.stack([np.full(files.shape, self._seed, np.int64),
                      epoch * self.num_examples + files.astype(np.int64)], 1)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(self._paths[files]), tf.string),
         self._labels[files].astype(np.int32), seeds))
    size = self._image_size
    ds = ds.map(lambda p, y, s: _train_example(p, y, s, size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self._local_batch, drop_remainder=True)
    return iter(ds.prefetch(2).as_numpy_iterator())

  def __next__(self) -> dict[str, np.ndarray]:
    at = (self._epoch, self._batch)
    if self._stream is None or self._stream_at != at:
      self._stream = self._open_stream(*at)
    images, labels = next(self._stream)
    self._batch += 1
    if self._batch == self.steps_per_epoch:
      self._epoch += 1
      self._batch = 0
      self._stream = None
    self._stream_at = (self._epoch, self._batch)
    return {"images": np.asarray(images, np.float32),
            "labels": np.asarray(labels, np.int32)}


def eval_pass(paths: Sequence[str], labels: np.ndarray, global_batch_size: int,
              *, image_size: int, process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass, every file exactly once, as `arrays.eval_batches`.

  Args:
    paths: [n] readable image files.
    labels: [n] integer labels.
    global_batch_size: examples per step summed over all processes.
    image_size: output resolution (crop of the `image_size + 32` resize).
    process_index: index of this process in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of dicts `{'images': float32 [B, S, S, 3], 'labels': int32
    [B], 'mask': float32 [B]}`, the last global batch zero-padded (mask 0).
  """
  labels = np.asarray(labels, np.int32)
  if labels.shape != (len(paths),):
    raise ValueError(f"labels must have shape [{len(paths)}], got "
                     f"{labels.shape}")
  local = arrays._local_batch_size(  # pylint: disable=protected-access
      global_batch_size, process_index, process_count)
  # This process's real examples of each global batch; the rest is padding.
  counts, mine = [], []
  for k in range(arrays.num_eval_batches(len(paths), global_batch_size)):
    start = k * global_batch_size + process_index * local
    stop = min(start + local, len(paths))
    counts.append(max(stop - start, 0))
    mine.extend(range(start, stop))
  return _eval_generator([paths[i] for i in mine], labels[mine], counts,
                         local, int(image_size))


def _eval_generator(paths: list[str], labels: np.ndarray, counts: list[int],
                    local: int,
                    image_size: int) -> Iterator[dict[str, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # An explicit dtype: a process may have no real examples (an empty list).
  ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string),
                                           labels))
  ds = ds.map(lambda p, y: _eval_example(p, y, image_size),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  stream = ds.prefetch(local).as_numpy_iterator()
  for real in counts:
    images = np.zeros((local, image_size, image_size, 3), np.float32)
    batch_labels = np.zeros((local,), np.int32)
    mask = np.zeros((local,), np.float32)
    for j in range(real):
      images[j], batch_labels[j] = next(stream)
    mask[:real] = 1.0
    yield {"images": images, "labels": batch_labels, "mask": mask}


def _listing(config: Any, split: str) -> tuple[list[str], np.ndarray, int]:
  ds = config.dataset
  paths, labels, names, skipped = list_with_skipped(
      ds.data_dir, split, ds.val_fraction, SPLIT_SEED)
  if len(names) > ds.num_classes:
    raise ValueError(f"{ds.data_dir!r} has {len(names)} classes but "
                     f"dataset.num_classes is {ds.num_classes}")
  return paths, labels, skipped


def train_iterator_from_config(config: Any) -> ImageFolderTrainIterator:
  """This process's training iterator for an `image_folder` config."""
  import jax  # pylint: disable=g-import-not-at-top
  paths, labels, skipped = _listing(config, "train")
  iterator = ImageFolderTrainIterator(
      paths, labels, config.batch_size, image_size=config.dataset.image_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  iterator.skipped = skipped
  return iterator


def eval_pass_from_config(config: Any) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's part of an `image_folder` val split."""
  import jax  # pylint: disable=g-import-not-at-top
  paths, labels, _ = _listing(config, "val")
  return eval_pass(paths, labels, config.eval_batch_size,
                   image_size=config.dataset.eval_image_size,
                   process_index=jax.process_index(),
                   process_count=jax.process_count())
