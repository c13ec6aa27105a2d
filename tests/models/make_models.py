#!/usr/bin/env python3
"""Builds the tiny graphs the tests and benchmarks use (committed; rerun to regenerate).

  slice_first/1/model.onnx  x float32 [N, M] -> y = x[:, 0:1] float32 [N, 1]
      Trivially cheap whatever the input size: it reads one element per row, so a benchmark
      on it measures transport, not compute. Batchable (dynamic N).
  relu/1/model.onnx         x float32 [N, M] -> y = relu(x) float32 [N, M]
      An output as large as the input: large answers (unread, inline or in the arena).
  range_sum/1/model.onnx    n float32 [1] -> y = 0 + 1 + ... + (n - 1) float32 []
      Cheap for a small n, as slow as n is large: its cost depends on an input's value, not
      its size (the hostile test of light batches run on the ring's poller). Not batchable.

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

# range_sum/1/model.onnx  n float32 [1] -> y = sum(range(n)) float32 []
#     A model whose run time follows an input's value (Range's length), not its shape.
n = helper.make_tensor_value_info("n", TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
consts = [
    helper.make_tensor("zero", TensorProto.INT64, [], [0]),
    helper.make_tensor("one", TensorProto.INT64, [], [1]),
]
graph = helper.make_graph(
    [
        helper.make_node("ReduceMax", ["n"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["limit"], to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["rf"], ["y"], keepdims=0),
    ],
    "range_sum",
    [n],
    [y],
    initializer=consts,
)
save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "range_sum")
