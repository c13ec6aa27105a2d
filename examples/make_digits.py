#!/usr/bin/env python3
"""Train the bundled example model: an MLP digit classifier on scikit-learn's digits data.

Writes
  examples/models/digits/1/model.onnx   input  "input" float32 [N, 64] (pixels 0..16)
                                        outputs "label" int64 [N], "probabilities" float32 [N, 10]
  examples/models/digits/model.toml     per-model settings
  examples/data/digits_test_x.npy       the held-out test split, float32 [360, 64]
  examples/data/digits_test_y.npy       its labels, int64 [360]
  examples/data/digit.npy               one test image, float32 [1, 64], for the quick start

Needs: pip install scikit-learn skl2onnx onnx numpy. Deterministic (fixed seeds).
"""
import pathlib

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

root = pathlib.Path(__file__).resolve().parent
x, y = load_digits(return_X_y=True)
x = x.astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=0)
clf.fit(x_train, y_train)
print(f"test accuracy: {clf.score(x_test, y_test):.4f}")

onx = to_onnx(
    clf,
    initial_types=[("input", FloatTensorType([None, 64]))],
    options={id(clf): {"zipmap": False}},
    target_opset=17,
)
onx.metadata_props.add(key="rxd.example", value="digits MLP, scikit-learn digits, see examples/make_digits.py")
out = root / "models" / "digits" / "1" / "model.onnx"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_bytes(onx.SerializeToString())
(root / "models" / "digits" / "model.toml").write_text(
    "# Per-model settings for the bundled digits classifier.\ninstances = 1\n"
)
data = root / "data"
data.mkdir(exist_ok=True)
np.save(data / "digits_test_x.npy", x_test)
np.save(data / "digits_test_y.npy", y_test.astype(np.int64))
np.save(data / "digit.npy", x_test[:1])
print(f"wrote {out} ({out.stat().st_size} bytes); first test label {y_test[0]}")
