"""Runs inside the TensorFlow venv (.venv-tf, made by scripts/test): reads TFRecord shards the way the TF
Object Detection API does and prints one JSON line per example for the test to check.

Usage: tf_reader.py SHARD...
"""

import json
import sys

import tensorflow as tf

SPEC = {
    "image/encoded": tf.io.FixedLenFeature((), tf.string),
    "image/format": tf.io.FixedLenFeature((), tf.string),
    "image/filename": tf.io.FixedLenFeature((), tf.string),
    "image/source_id": tf.io.FixedLenFeature((), tf.string),
    "image/height": tf.io.FixedLenFeature((), tf.int64),
    "image/width": tf.io.FixedLenFeature((), tf.int64),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/group_of": tf.io.VarLenFeature(tf.int64),
    "image/object/occluded": tf.io.VarLenFeature(tf.int64),
    "image/object/truncated": tf.io.VarLenFeature(tf.int64),
    "image/object/depiction": tf.io.VarLenFeature(tf.int64),
    "image/class/text": tf.io.VarLenFeature(tf.string),
    "image/class/label": tf.io.VarLenFeature(tf.int64),
    "image/class/confidence": tf.io.VarLenFeature(tf.float32),
    "image/segmentation/object/mask": tf.io.VarLenFeature(tf.string),
}


def dense(t):
    v = (tf.sparse.to_dense(t) if isinstance(t, tf.SparseTensor) else t).numpy()
    return v.tolist() if hasattr(v, "tolist") else v


def main() -> None:
    for shard in sys.argv[1:]:
        for ex in tf.data.TFRecordDataset(shard):  # checks both CRCs of every record
            print_example(shard, ex)


def print_example(shard: str, ex) -> None:
    f = tf.io.parse_single_example(ex, SPEC)
    img = tf.io.decode_image(f["image/encoded"], channels=3)
    masks = tf.sparse.to_dense(f["image/segmentation/object/mask"], default_value=b"").numpy().tolist()
    out = {k: dense(v) for k, v in f.items() if k not in ("image/encoded", "image/segmentation/object/mask")}
    for k, v in out.items():
        if isinstance(v, bytes):
            out[k] = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            out[k] = [x.decode() for x in v]
    out["decoded_shape"] = list(img.shape)
    out["mask_shapes"] = [list(tf.io.decode_png(m).shape) if m else None for m in masks]
    out["shard"] = shard
    print(json.dumps(out))


if __name__ == "__main__":
    main()
