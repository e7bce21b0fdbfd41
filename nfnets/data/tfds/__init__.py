"""TFDS image classification datasets, read by index.

`source` opens a prepared split for random access (`open_split`, `load`);
`prepare` prepares a manual-download dataset offline (`prepare`) or adds
array_record shards to a tfrecord one (`convert`); `builders` holds what both
share. TensorFlow is imported only when a function needs it.
"""
