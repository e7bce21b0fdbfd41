"""tf.data decoding and augmentation of encoded images read by index.

A *source* is anything with `num_examples` and `read(indices)` returning the
encoded image bytes (JPEG, PNG, ...) and int32 labels of those examples, in
order: an image folder (`image_folder.ImageFolderSource`) or a prepared TFDS
dataset (`tfds.source.TFDSSource`). Reading by index lets every source share
`arrays.EpochSampler`'s order: seeded epoch permutations, per-process
contiguous slices of each global batch, and an (epoch, batch) position that
resumes exactly.

Randomness never depends on the process count: a crop's window and flip
are seeded by (seed, epoch, image index). Training batches leave the host as
uint8 crops; MixUp, CutMix and RandAugment run on the accelerator, inside the
train step (`nfnets.augment.batch`).

Only this module and the sources import TensorFlow, inside functions, so the
trainer, models and digits data never need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from nfnets.data import arrays
from nfnets.data import transforms

# Whole crop boxes for `sample_distorted_bounding_box`: the image itself.
_WHOLE_IMAGE = [[[0.0, 0.0, 1.0, 1.0]]]


class Source(Protocol):
  """Random access to a dataset's encoded images and labels."""

  @property
  def num_examples(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The host's part of the training preprocessing (released `dataset.py`).

  Per crop: an Inception-style random crop fused with decoding (a centre
  crop when sampling returns the whole image), a bicubic resize to
  `image_size` (not antialiased), a random flip, and rounding to uint8.
  MixUp, CutMix and RandAugment run on the accelerator
  (`nfnets.augment.batch.DeviceAugment`), which needs `crops_per_example`
  crops for each training example.

  Attributes:
    image_size: output resolution.
    crops_per_example: 2 when mixing (the released code mixes 2B crops into
      B examples), else 1.
  """
  image_size: int
  crops_per_example: int = 1


def _decode(raw, crop_window=None):
  """Decodes encoded bytes to uint8 RGB [h, w, 3], optionally cropping.

  JPEGs use the accurate integer IDCT (bit-identical to PIL; the default fast
  one is 1.5 grey levels off) and decode only `crop_window` = [y, x, h, w]
  when given; other formats decode whole, then crop. A truncated JPEG (PIL's
  listing check does not decode) yields its decoded rows rather than failing
  mid-epoch.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  jpeg = dict(channels=3, dct_method="INTEGER_ACCURATE",
              try_recover_truncated=True, acceptable_fraction=0.0)

  def decode_jpeg():
    if crop_window is None:
      return tf.io.decode_jpeg(raw, **jpeg)
    return tf.image.decode_and_crop_jpeg(raw, crop_window, **jpeg)

  def decode_other():
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    if crop_window is None:
      return image
    return tf.slice(image, [crop_window[0], crop_window[1], 0],
                    [crop_window[2], crop_window[3], 3])

  image = tf.cond(tf.io.is_jpeg(raw), decode_jpeg, decode_other)
  image.set_shape([None, None, 3])
  return image


def _image_shape(raw):
  """[h, w] of encoded bytes, from the header alone for JPEGs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.cond(
      tf.io.is_jpeg(raw),
      lambda: tf.image.extract_jpeg_shape(raw)[:2],
      lambda: tf.shape(tf.io.decode_image(raw, channels=3,
                                          expand_animations=False))[:2])


def _centre_square(shape, size: int, scaled_size: int):
  """[y, x, side, side]: the centred square `size / scaled_size` of the
  shorter side.

  As the released `_decode_and_center_crop`: the side truncated, offsets
  `(dim - side + 1) // 2`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  side = tf.cast(tf.cast(tf.reduce_min(shape), tf.float32) * size /
                 scaled_size, tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2,
                   side, side])


def _normalize(images):
  """Float pixels on the 0-255 scale -> (x - mean) / std."""
  return ((images - np.asarray(transforms.MEAN_RGB, np.float32)) /
          np.asarray(transforms.STDDEV_RGB, np.float32))


def _train_example(raw, label, seed, image_size: int):
  """One training crop: uint8 [S, S, 3] and the label.

  As the released `_decode_and_random_crop` and `_preprocess_image`:
  `sample_distorted_bounding_box` with `min_object_covered=0.1`, area
  (0.08, 1), aspect (3/4, 4/3) and 10 attempts, and when it returns the
  whole image the centre crop `S / (S + 32)` of the shorter side; then a
  bicubic resize (TF's, not antialiased) and a flip. The released code mixes
  the float resize; here it is rounded to uint8 for the trip to the device,
  which moves a value by at most half a grey level (and clips overshoots).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  shape = _image_shape(raw)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0), bounding_boxes=tf.constant(_WHOLE_IMAGE),
      seed=crop_seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  s = image_size
  centre = _centre_square(shape, s, s + 32)
  whole = tf.reduce_all(tf.equal(size[:2], shape))
  image = _decode(raw, tf.where(whole, centre, window))
  image = tf.image.resize(image, [s, s], method="bicubic")
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label


def _eval_example(raw, label, image_size: int,
                  preproc: transforms.EvalPreproc, interpolation: str):
  """The evaluation transform of `eval_pass`, on one encoded image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  s = image_size
  scaled = preproc.scaled_size(s)
  if preproc.mode == "resize_crop":
    image = _decode(raw)
    size = [scaled, scaled]
  else:
    shape = _image_shape(raw)
    image = _decode(raw, _centre_square(shape, s, scaled))
    size = [s, s]
  antialias = interpolation == "bicubic_antialias"
  image = tf.image.resize(image, size, method="bicubic", antialias=antialias)
  if antialias:
    # Antialiased bicubic rounded to uint8 levels is PIL's BICUBIC to within
    # one grey level (tests/test_pipeline.py).
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  if preproc.mode == "resize_crop":
    offset = (scaled - s + 1) // 2
    image = image[offset:offset + s, offset:offset + s]
  return _normalize(image), label


def _encoded_stream(source: Source, indices: np.ndarray, chunk: int,
                    *extra: np.ndarray):
  """A tf.data.Dataset of (bytes, label, *extra rows) for `indices`, in order.

  Reads `chunk` examples per call of `source.read` in the generator thread;
  decoding runs in the parallel map that follows.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def generate():
    for start in range(0, len(indices), chunk):
      stop = start + chunk
      asked = indices[start:stop]
      images, labels = source.read(asked)
      if len(images) != len(asked) or len(labels) != len(asked):
        raise ValueError(f"source {source!r} returned {len(images)} images "
                         f"and {len(labels)} labels for {len(asked)} indices")
      rows = [e[start:stop] for e in extra]
      for k, (image, label) in enumerate(zip(images, labels)):
        yield (image, label) + tuple(r[k] for r in rows)

  signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32))
  signature += tuple(tf.TensorSpec(e.shape[1:], tf.as_dtype(e.dtype))
                     for e in extra)
  return tf.data.Dataset.from_generator(generate, output_signature=signature)


class SourceTrainIterator(arrays.EpochSampler):
  """Infinite, shuffled, resumable per-process batches decoded by tf.data.

  Streams this process's slices of the rest of the current epoch through one
  prefetching tf.data pipeline, rebuilt at each epoch and after `set_state`.
  Yields `{'images': uint8 [C * B, S, S, 3], 'labels': int32 [C * B]}` for
  B examples of C = `augment.crops_per_example` crops each (example j's are
  rows C j ... C j + C - 1); an epoch is a pass over the source's images, so
  with two crops per example it holds half as many examples as images (the
  released code's epochs count examples: `num_examples` is the images).
  """

  def __init__(self, source: Source, global_batch_size: int, *,
               augment: TrainAugment, seed: int, process_index: int = 0,
               process_count: int = 1):
    """Initialises the iterator at the start of epoch 0.

    Args:
      source: the training examples.
      global_batch_size: examples per step summed over all processes.
      augment: the host's preprocessing.
      seed: seed for shuffling and the crops.
      process_index: index of this process in [0, process_count).
      process_count: number of processes sharing each global batch.

    Raises:
      ValueError: for inconsistent batch sizes.
    """
    crops = global_batch_size * augment.crops_per_example
    if augment.crops_per_example > 1 and crops > source.num_examples:
      raise ValueError(
          f"batch_size {global_batch_size} reads {crops} images a step (two "
          "crops per example with MixUp/CutMix), more than the "
          f"{source.num_examples} training images")
    super().__init__(source.num_examples, crops, seed=seed,
                     process_index=process_index, process_count=process_count)
    self._source = source
    self._augment = augment
    self._stream = None
    self._stream_at = None  # (epoch, batch) the stream yields next.

  def _open_stream(self, epoch: int, batch: int) -> Iterator[Any]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    local = self.local_batch_size
    firsts = [self._first_position(k) for k in range(batch,
                                                     self.steps_per_epoch)]
    positions = (np.asarray(firsts, np.int64)[:, None] +
                 np.arange(local)).reshape(-1)
    files = self._permutation(epoch)[positions].astype(np.int64)
    seeds = np.stack([np.full(positions.shape, self._seed, np.int64),
                      epoch * self.num_examples + files], 1)
    ds = _encoded_stream(self._source, files, local, seeds)
    size = self._augment.image_size
    ds = ds.map(lambda raw, y, s: _train_example(raw, y, s, size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    return iter(ds.prefetch(2).as_numpy_iterator())

  def __next__(self) -> dict[str, np.ndarray]:
    at = (self._epoch, self._batch)
    if self._stream is None or self._stream_at != at:
      self._stream = self._open_stream(*at)
    images, labels = next(self._stream)
    self._advance()
    if self._batch == 0:
      self._stream = None  # A new epoch: a new permutation.
    self._stream_at = (self._epoch, self._batch)
    return {"images": images, "labels": labels}


def eval_pass(source: Source, global_batch_size: int, *, image_size: int,
              preproc: str = "resize_crop_32",
              interpolation: str = "bicubic", process_index: int = 0,
              process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass, every example exactly once, as `arrays.eval_batches`.

  Args:
    source: the evaluation examples.
    global_batch_size: examples per step summed over all processes.
    image_size: output resolution S.
    preproc: the crop, named as the released code's `eval_preproc`
      (`transforms.EvalPreproc`): 'resize_crop_32' (resize to S + 32
      ignoring the aspect ratio, centre crop S: the released NFNets'),
      'resize_crop_0.875', 'crop_resize' (centre crop S / (S + 32) of the
      shorter side, resize to S), ...
    interpolation: 'bicubic' (the released code's TF resize: not
      antialiased, in float) or 'bicubic_antialias' (PIL's BICUBIC:
      antialiased, rounded to uint8 levels).
    process_index: index of this process in [0, process_count).
    process_count: number of processes sharing each global batch.

  Returns:
    An iterator of dicts `{'images': float32 [B, S, S, 3], 'labels': int32
    [B], 'mask': float32 [B]}`, the last global batch zero-padded (mask 0).

  Raises:
    ValueError: for an unknown `preproc` or `interpolation`, or
      inconsistent batch sizes.
  """
  parsed = transforms.parse_eval_preproc(preproc)
  if interpolation not in transforms.EVAL_INTERPOLATIONS:
    raise ValueError(f"unknown eval interpolation {interpolation!r}; valid: "
                     f"{', '.join(transforms.EVAL_INTERPOLATIONS)}")
  n = source.num_examples
  local = arrays._local_batch_size(  # pylint: disable=protected-access
      global_batch_size, process_index, process_count)
  # This process's real examples of each global batch; the rest is padding.
  counts, mine = [], []
  for k in range(arrays.num_eval_batches(n, global_batch_size)):
    start = k * global_batch_size + process_index * local
    stop = min(start + local, n)
    counts.append(max(stop - start, 0))
    mine.extend(range(start, stop))
  return _eval_generator(source, np.asarray(mine, np.int64), counts, local,
                         int(image_size), parsed, interpolation)


def _eval_generator(source: Source, indices: np.ndarray, counts: Sequence[int],
                    local: int, image_size: int,
                    preproc: transforms.EvalPreproc,
                    interpolation: str) -> Iterator[dict[str, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = _encoded_stream(source, indices, local)
  ds = ds.map(lambda raw, y: _eval_example(raw, y, image_size, preproc,
                                            interpolation),
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
