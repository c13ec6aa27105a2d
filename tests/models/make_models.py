#!/usr/bin/env python3
"""Builds the tiny graphs the tests and benchmarks use (committed; rerun to regenerate).

  slice_first/1/model.onnx  x float32 [N, M] -> y = x[:, 0:1] float32 [N, 1]
      Trivially cheap whatever the input size: it reads one element per row, so a benchmark
      on it measures transport, not compute. Batchable (dynamic N).
  relu/1/model.onnx         x float32 [N, M] -> y = relu(x) float32 [N, M]
      An output as large as the input: large answers (unread, inline or in the arena).

Needs: pip install onnx
"""
import pathlib

import onnx
from onnx import TensorProto, helper

root = pathlib.Path(__file__).resolve().parent


def save(model, name):
    out = root / name / "1" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    out.write_bytes(model.SerializeToString())
    print(f"wrote {out}")


x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
consts = [
    helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
    helper.make_tensor("ends", TensorProto.INT64, [1], [1]),
    helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
]
graph = helper.make_graph(
    [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
    "slice_first",
    [x],
    [y],
    initializer=consts,
)
save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "slice_first")

# relu/1/model.onnx  x float32 [N, M] -> y = relu(x) float32 [N, M]
#     An output as large as its input, of any size: for tests of large answers (unread answers,
#     inline vs arena outputs). Batchable (dynamic N).
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "relu")
