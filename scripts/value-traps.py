#!/usr/bin/env python3
"""Which of ONNX Runtime's CPU kernels kill the process on an input's *values*?

A request's values reach kernels as lengths, indices, axes, shapes, steps and scales that no
validation of shapes can check. A kernel that traps on one (SIGFPE, SIGSEGV) takes the daemon
down with every user's requests, so each such trap needs a guard at load
(`rxd_compress::guard`). This runs one-node models of about 80 operators over extreme values
of every numeric input, each run in a forked child (address space capped at 3 GiB, 3 s
alarm), and prints each operator's count of cases, clean errors and deaths, with the first
values that killed a child. Re-run it when ONNX Runtime is upgraded:

    python3 -m venv venv && venv/bin/pip install onnx onnxruntime numpy
    venv/bin/python scripts/value-traps.py [OPERATOR_NAME_PART ...]   # all, or those matching

With ONNX Runtime 1.32 only int32/int64 Div (the minimum by -1) and STFT (frame_length 0)
killed the process; both are guarded, and so is integer Mod (ARCHITECTURE.md, "Native
aborts").
"""
import itertools
import os
import resource
import signal
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

so = ort.SessionOptions()
so.log_severity_level = 4
so.intra_op_num_threads = 1
I64 = [np.iinfo(np.int64).min, np.iinfo(np.int64).min + 1, -2**62, -2**32, np.iinfo(np.int32).min,
       -2, -1, 0, 1, 2, 3, 2**31, 2**32, 2**62, np.iinfo(np.int64).max]
I32 = [v for v in I64 if -2**31 <= v < 2**31]
F = [0.0, -0.0, 1e-45, -1.0, 1e30, -1e30, np.inf, -np.inf, np.nan, 0.5, 2.0]
f = np.float32
ONLY = sys.argv[1:]
DIED = []


def vi(n, t, shape):
    return h.make_tensor_value_info(n, t, shape)


def A(*v, t=np.int64):
    return np.array(v, t)


def S(v, t=np.int64):
    return np.array(v, t)


def run(name, nodes, ins, outs, feeds_list, opset=17):
    """Runs a model of `nodes` once per feed dict, each in a forked child."""
    if ONLY and not any(o.lower() in name.lower() for o in ONLY):
        return
    g = h.make_graph(nodes, "g", ins, outs)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    try:
        s = ort.InferenceSession(m.SerializeToString(), so)
    except Exception as e:  # noqa: BLE001 - an operator this build lacks
        print(f"{name}: not loadable here: {str(e)[:120]}", flush=True)
        return
    bad, errors = [], 0
    for feeds in feeds_list:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
            signal.alarm(3)
            try:
                s.run(None, feeds)
                os._exit(0)
            except Exception:  # noqa: BLE001
                os._exit(3)
        _, st = os.waitpid(pid, 0)
        if os.WIFSIGNALED(st) and os.WTERMSIG(st) != signal.SIGALRM:
            shown = {k: (v.tolist() if v.size < 8 else v.shape) for k, v in feeds.items()}
            bad.append((signal.Signals(os.WTERMSIG(st)).name, shown))
        elif os.WIFEXITED(st) and os.WEXITSTATUS(st) == 3:
            errors += 1
    print(f"{name}: {len(feeds_list)} cases, {errors} errors, {len(bad)} died", flush=True)
    for b in bad[:6]:
        print("   ", b, flush=True)
    if bad:
        DIED.append(name)


for t, tt in [(np.int64, T.INT64), (np.int32, T.INT32)]:
  vals = [v for v in I64 if np.iinfo(t).min <= v <= np.iinfo(t).max]
  run(f"Range {t.__name__}", [h.make_node("Range", ["a","b","c"], ["y"])], [vi("a",tt,[]),vi("b",tt,[]),vi("c",tt,[])], [vi("y",tt,None)],
    [{"a":S(a,t),"b":S(b,t),"c":S(c,t)} for a,b,c in itertools.product(vals, repeat=3)])
x = np.arange(6, dtype=np.float32)
run("Slice", [h.make_node("Slice", ["x","s","e","a","st"], ["y"])], [vi("x",T.FLOAT,[6]),vi("s",T.INT64,[1]),vi("e",T.INT64,[1]),vi("a",T.INT64,[1]),vi("st",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":x,"s":A(s),"e":A(e),"a":A(a),"st":A(st)} for s,e,st in itertools.product(I64, repeat=3) for a in [0]])
run("Tile", [h.make_node("Tile", ["x","r"], ["y"])], [vi("x",T.FLOAT,[2]),vi("r",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(2,np.float32),"r":A(r)} for r in I64])
run("Tile2", [h.make_node("Tile", ["x","r"], ["y"])], [vi("x",T.FLOAT,[1,1]),vi("r",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1),np.float32),"r":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
run("Expand", [h.make_node("Expand", ["x","s"], ["y"])], [vi("x",T.FLOAT,[1]),vi("s",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(1,np.float32),"s":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
run("ConstantOfShape", [h.make_node("ConstantOfShape", ["s"], ["y"])], [vi("s",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"s":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
run("Reshape", [h.make_node("Reshape", ["x","s"], ["y"])], [vi("x",T.FLOAT,[6]),vi("s",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(6,np.float32),"s":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
run("OneHot", [h.make_node("OneHot", ["i","d","v"], ["y"])], [vi("i",T.INT64,[2]),vi("d",T.INT64,[1]),vi("v",T.FLOAT,[2])], [vi("y",T.FLOAT,None)],
    [{"i":A(a,a),"d":A(d),"v":np.array([0,1],np.float32)} for a,d in itertools.product(I64, repeat=2)])
run("TopK", [h.make_node("TopK", ["x","k"], ["v","i"])], [vi("x",T.FLOAT,[4]),vi("k",T.INT64,[1])], [vi("v",T.FLOAT,None),vi("i",T.INT64,None)],
    [{"x":np.arange(4,dtype=np.float32),"k":A(k)} for k in I64])
run("Trilu", [h.make_node("Trilu", ["x","k"], ["y"])], [vi("x",T.FLOAT,[3,3]),vi("k",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((3,3),np.float32),"k":S(k)} for k in I64])
run("Trilu lower", [h.make_node("Trilu", ["x","k"], ["y"], upper=0)], [vi("x",T.FLOAT,[3,3]),vi("k",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((3,3),np.float32),"k":S(k)} for k in I64])
run("CumSum", [h.make_node("CumSum", ["x","a"], ["y"])], [vi("x",T.FLOAT,[3]),vi("a",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"a":S(a)} for a in I64])
for op in ["Unsqueeze","Squeeze","ReduceSum"]:
  run(op, [h.make_node(op, ["x","a"], ["y"])], [vi("x",T.FLOAT,[1,3]),vi("a",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,3),np.float32),"a":A(a)} for a in I64])
for op in ["ReduceMax","ReduceMean","ReduceL2","ReduceLogSumExp","ReduceProd","ReduceMin"]:
  run(op, [h.make_node(op, ["x","a"], ["y"])], [vi("x",T.FLOAT,[1,3]),vi("a",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,3),np.float32),"a":A(a)} for a in I64], opset=18)
run("Split", [h.make_node("Split", ["x","s"], ["a","b"])], [vi("x",T.FLOAT,[4]),vi("s",T.INT64,[2])], [vi("a",T.FLOAT,None),vi("b",T.FLOAT,None)],
    [{"x":np.ones(4,np.float32),"s":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
for mode in ["constant","reflect","edge","wrap"]:
  run(f"Pad {mode}", [h.make_node("Pad", ["x","p"], ["y"], mode=mode)], [vi("x",T.FLOAT,[3]),vi("p",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"p":A(a,b)} for a,b in itertools.product(I64, repeat=2)], opset=19)
run("GatherElements", [h.make_node("GatherElements", ["x","i"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":A(a)} for a in I64])
run("GatherND", [h.make_node("GatherND", ["x","i"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":A(a)} for a in I64])
run("Gather", [h.make_node("Gather", ["x","i"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":A(a)} for a in I64])
run("Gather32", [h.make_node("Gather", ["x","i"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT32,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":A(a,t=np.int32)} for a in I64 if -2**31 <= a < 2**31])
run("ScatterND", [h.make_node("ScatterND", ["x","i","u"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT64,[1,1]),vi("u",T.FLOAT,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":np.array([[a]],np.int64),"u":np.ones(1,np.float32)} for a in I64])
run("ScatterElements", [h.make_node("ScatterElements", ["x","i","u"], ["y"])], [vi("x",T.FLOAT,[3]),vi("i",T.INT64,[1]),vi("u",T.FLOAT,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"i":A(a),"u":np.ones(1,np.float32)} for a in I64])
for mode in ["nearest","linear","cubic"]:
  run(f"Resize scales {mode}", [h.make_node("Resize", ["x","","s"], ["y"], mode=mode)], [vi("x",T.FLOAT,[1,1,2,2]),vi("s",T.FLOAT,[4])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2,2),np.float32),"s":np.array([1,1,a,b],np.float32)} for a,b in itertools.product(F, repeat=2)])
  run(f"Resize sizes {mode}", [h.make_node("Resize", ["x","","","z"], ["y"], mode=mode)], [vi("x",T.FLOAT,[1,1,2,2]),vi("z",T.INT64,[4])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2,2),np.float32),"z":A(1,1,a,b)} for a,b in itertools.product(I64, repeat=2)])
  run(f"Resize roi {mode}", [h.make_node("Resize", ["x","r","s"], ["y"], mode=mode, coordinate_transformation_mode="tf_crop_and_resize")], [vi("x",T.FLOAT,[1,1,2,2]),vi("r",T.FLOAT,[8]),vi("s",T.FLOAT,[4])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2,2),np.float32),"r":np.array([0,0,a,a,1,1,b,b],np.float32),"s":np.array([1,1,2,2],np.float32)} for a,b in itertools.product(F, repeat=2)])
run("NMS", [h.make_node("NonMaxSuppression", ["b","s","m","i","t"], ["y"])], [vi("b",T.FLOAT,[1,2,4]),vi("s",T.FLOAT,[1,1,2]),vi("m",T.INT64,[1]),vi("i",T.FLOAT,[1]),vi("t",T.FLOAT,[1])], [vi("y",T.INT64,None)],
    [{"b":np.array([[[0,0,1,1],[a,a,b,b]]],np.float32),"s":np.array([[[0.5,0.6]]],np.float32),"m":A(m),"i":np.array([0.5],np.float32),"t":np.array([b],np.float32)} for m in I64 for a,b in [(0,1),(np.nan,np.nan),(np.inf,-np.inf),(1e30,-1e30)]])
run("STFT", [h.make_node("STFT", ["x","st","","fl"], ["y"])], [vi("x",T.FLOAT,[1,16,1]),vi("st",T.INT64,[]),vi("fl",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,16,1),np.float32),"st":S(a),"fl":S(b)} for a,b in itertools.product(I64, repeat=2)])
run("DFT", [h.make_node("DFT", ["x","l"], ["y"])], [vi("x",T.FLOAT,[1,8,1]),vi("l",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,8,1),np.float32),"l":S(a)} for a in I64])
run("DFT20", [h.make_node("DFT", ["x","l","a"], ["y"])], [vi("x",T.FLOAT,[1,8,1]),vi("l",T.INT64,[]),vi("a",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,8,1),np.float32),"l":S(a),"a":S(b)} for a,b in itertools.product(I64, repeat=2)], opset=20)
for op in ["HannWindow","HammingWindow","BlackmanWindow"]:
  for per in [0,1]:
    run(f"{op} periodic={per}", [h.make_node(op, ["n"], ["y"], periodic=per)], [vi("n",T.INT64,[])], [vi("y",T.FLOAT,None)],
      [{"n":S(a)} for a in I64])
run("MelWeightMatrix", [h.make_node("MelWeightMatrix", ["a","b","c","d","e"], ["y"])], [vi("a",T.INT64,[]),vi("b",T.INT64,[]),vi("c",T.INT64,[]),vi("d",T.FLOAT,[]),vi("e",T.FLOAT,[])], [vi("y",T.FLOAT,None)],
    [{"a":S(a),"b":S(b),"c":S(c),"d":np.array(d,np.float32),"e":np.array(e,np.float32)} for a,b,c in itertools.product([0,1,2,-1,2**40],[0,1,2,-1,2**40],[0,1,-1,16000]) for d,e in [(0,1),(1,0),(0,0),(np.nan,1)]])
run("Col2Im", [h.make_node("Col2Im", ["x","i","b"], ["y"])], [vi("x",T.FLOAT,[1,4,4]),vi("i",T.INT64,[2]),vi("b",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,4,4),np.float32),"i":A(a,a),"b":A(b,b)} for a,b in itertools.product([0,1,2,3,4,-1,2**31,2**62,np.iinfo(np.int64).min,np.iinfo(np.int64).max], repeat=2)], opset=18)
run("AffineGrid", [h.make_node("AffineGrid", ["t","s"], ["y"])], [vi("t",T.FLOAT,[1,2,3]),vi("s",T.INT64,[4])], [vi("y",T.FLOAT,None)],
    [{"t":np.ones((1,2,3),np.float32),"s":A(1,1,a,b)} for a,b in itertools.product(I64, repeat=2)], opset=20)
run("CenterCropPad", [h.make_node("CenterCropPad", ["x","s"], ["y"])], [vi("x",T.FLOAT,[3]),vi("s",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"s":A(a)} for a in I64], opset=18)
for mode in ["bilinear","nearest","bicubic"]:
  for pm in ["zeros","border","reflection"]:
    run(f"GridSample {mode} {pm}", [h.make_node("GridSample", ["x","g"], ["y"], mode=mode, padding_mode=pm)], [vi("x",T.FLOAT,[1,1,2,2]),vi("g",T.FLOAT,[1,1,1,2])], [vi("y",T.FLOAT,None)],
      [{"x":np.ones((1,1,2,2),np.float32),"g":np.array([[[[a,b]]]],np.float32)} for a,b in itertools.product(F, repeat=2)], opset=16)
run("RoiAlign", [h.make_node("RoiAlign", ["x","r","b"], ["y"])], [vi("x",T.FLOAT,[1,1,4,4]),vi("r",T.FLOAT,[1,4]),vi("b",T.INT64,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,4,4),np.float32),"r":np.array([[a,a,c,c]],np.float32),"b":A(b)} for a in F for c in [1.0, np.nan, 1e30] for b in [0,1,-1,2**40,np.iinfo(np.int64).min]])
run("MaxRoiPool", [h.make_node("MaxRoiPool", ["x","r"], ["y"], pooled_shape=[2,2])], [vi("x",T.FLOAT,[1,1,4,4]),vi("r",T.FLOAT,[1,5])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,4,4),np.float32),"r":np.array([[b,a,a,c,c]],np.float32)} for a in F for c in [1.0,np.nan,1e30,-1e30] for b in [0,1,-1,1e20,np.nan]])
run("MaxUnpool", [h.make_node("MaxUnpool", ["x","i","s"], ["y"], kernel_shape=[2], strides=[2])], [vi("x",T.FLOAT,[1,1,2]),vi("i",T.INT64,[1,1,2]),vi("s",T.INT64,[3])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2),np.float32),"i":np.array([[[a,0]]],np.int64),"s":A(1,1,b)} for a,b in itertools.product(I64, repeat=2)])
run("Compress", [h.make_node("Compress", ["x","c"], ["y"])], [vi("x",T.FLOAT,[3]),vi("c",T.BOOL,["n"])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,np.float32),"c":np.ones(n,bool)} for n in [0,1,3,4,100]])
run("SplitToSequence+At", [h.make_node("SplitToSequence", ["x","s"], ["q"]), h.make_node("SequenceAt", ["q","p"], ["y"])], [vi("x",T.FLOAT,[4]),vi("s",T.INT64,[]),vi("p",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(4,np.float32),"s":S(a),"p":S(b)} for a,b in itertools.product(I64, repeat=2)])
run("EyeLike", [h.make_node("Shape", ["x"], ["s"]), h.make_node("ConstantOfShape", ["s"], ["z"]), h.make_node("EyeLike", ["z"], ["y"], k=5)], [vi("x",T.FLOAT,[2,2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((2,2),np.float32)}])
run("QuantizeLinear", [h.make_node("QuantizeLinear", ["x","s","z"], ["y"])], [vi("x",T.FLOAT,[2]),vi("s",T.FLOAT,[]),vi("z",T.UINT8,[])], [vi("y",T.UINT8,None)],
    [{"x":np.array([a,a],np.float32),"s":np.array(b,np.float32),"z":np.array(3,np.uint8)} for a,b in itertools.product(F, repeat=2)])
run("DynamicQuantizeLinear", [h.make_node("DynamicQuantizeLinear", ["x"], ["y","s","z"])], [vi("x",T.FLOAT,[2])], [vi("y",T.UINT8,None),vi("s",T.FLOAT,None),vi("z",T.UINT8,None)],
    [{"x":np.array([a,b],np.float32)} for a,b in itertools.product(F, repeat=2)])
run("BitShift", [h.make_node("BitShift", ["x","n"], ["y"], direction="LEFT")], [vi("x",T.UINT64,[1]),vi("n",T.UINT64,[1])], [vi("y",T.UINT64,None)],
    [{"x":np.array([1],np.uint64),"n":np.array([n],np.uint64)} for n in [0,63,64,65,2**63,2**64-1]])
for t,tt in [(np.int32,T.INT32),(np.int64,T.INT64)]:
  run(f"Pow {t.__name__}", [h.make_node("Pow", ["x","n"], ["y"])], [vi("x",tt,[1]),vi("n",tt,[1])], [vi("y",tt,None)],
    [{"x":np.array([a],t),"n":np.array([b],t)} for a,b in itertools.product([v for v in I64 if np.iinfo(t).min<=v<=np.iinfo(t).max], repeat=2)])
# RNNs with sequence_lens (values)
for op, gates in [("RNN",1),("GRU",3),("LSTM",4)]:
    H, Inp, S = 2, 3, 4
    ins = [vi("x",T.FLOAT,[S,1,Inp]), vi("w",T.FLOAT,[1,gates*H,Inp]), vi("r",T.FLOAT,[1,gates*H,H]), vi("b",T.FLOAT,[1,2*gates*H]), vi("l",T.INT32,[1])]
    run(op, [h.make_node(op, ["x","w","r","b","l"], ["y"], hidden_size=H)], ins, [vi("y",T.FLOAT,None)],
        [{"x":np.ones((S,1,Inp),f),"w":np.ones((1,gates*H,Inp),f),"r":np.ones((1,gates*H,H),f),"b":np.ones((1,2*gates*H),f),"l":A(l,t=np.int32)} for l in I32])
    run(op+" reverse", [h.make_node(op, ["x","w","r","b","l"], ["y"], hidden_size=H, direction="bidirectional")],
        [vi("x",T.FLOAT,[S,1,Inp]), vi("w",T.FLOAT,[2,gates*H,Inp]), vi("r",T.FLOAT,[2,gates*H,H]), vi("b",T.FLOAT,[2,2*gates*H]), vi("l",T.INT32,[1])], [vi("y",T.FLOAT,None)],
        [{"x":np.ones((S,1,Inp),f),"w":np.ones((2,gates*H,Inp),f),"r":np.ones((2,gates*H,H),f),"b":np.ones((2,2*gates*H),f),"l":A(l,t=np.int32)} for l in I32])
run("ReverseSequence", [h.make_node("ReverseSequence", ["x","l"], ["y"], batch_axis=1, time_axis=0)], [vi("x",T.FLOAT,[4,2]),vi("l",T.INT64,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((4,2),f),"l":A(a,b)} for a,b in itertools.product(I64, repeat=2)])
run("Upsample", [h.make_node("Upsample", ["x","s"], ["y"])], [vi("x",T.FLOAT,[1,1,2,2]),vi("s",T.FLOAT,[4])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2,2),f),"s":np.array([1,1,a,b],f)} for a,b in itertools.product(F, repeat=2)], opset=9)
run("Unique", [h.make_node("Unique", ["x"], ["y","i","v","c"])], [vi("x",T.FLOAT,[3])], [vi("y",T.FLOAT,None),vi("i",T.INT64,None),vi("v",T.INT64,None),vi("c",T.INT64,None)],
    [{"x":np.array([a,b,a],f)} for a,b in itertools.product(F, repeat=2)])
# contrib ops
E, V, Hd = 4, 5, 4
run("EmbedLayerNormalization", [h.make_node("EmbedLayerNormalization", ["ids","seg","we","pe","se","g","b"], ["y","m"], domain="com.microsoft")],
    [vi("ids",T.INT32,[1,2]),vi("seg",T.INT32,[1,2]),vi("we",T.FLOAT,[V,E]),vi("pe",T.FLOAT,[V,E]),vi("se",T.FLOAT,[2,E]),vi("g",T.FLOAT,[E]),vi("b",T.FLOAT,[E])], [vi("y",T.FLOAT,None),vi("m",T.INT32,None)],
    [{"ids":A(a,0,t=np.int32).reshape(1,2),"seg":A(b,0,t=np.int32).reshape(1,2),"we":np.ones((V,E),f),"pe":np.ones((V,E),f),"se":np.ones((2,E),f),"g":np.ones(E,f),"b":np.ones(E,f)} for a,b in itertools.product(I32, repeat=2)])
run("Attention mask_index", [h.make_node("Attention", ["x","w","b","mi"], ["y"], num_heads=1, domain="com.microsoft")],
    [vi("x",T.FLOAT,[1,2,Hd]),vi("w",T.FLOAT,[Hd,3*Hd]),vi("b",T.FLOAT,[3*Hd]),vi("mi",T.INT32,[1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,2,Hd),f),"w":np.ones((Hd,3*Hd),f),"b":np.ones(3*Hd,f),"mi":A(a,t=np.int32)} for a in I32])
run("Attention mask_index2", [h.make_node("Attention", ["x","w","b","mi"], ["y"], num_heads=1, domain="com.microsoft")],
    [vi("x",T.FLOAT,[1,2,Hd]),vi("w",T.FLOAT,[Hd,3*Hd]),vi("b",T.FLOAT,[3*Hd]),vi("mi",T.INT32,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,2,Hd),f),"w":np.ones((Hd,3*Hd),f),"b":np.ones(3*Hd,f),"mi":A(a,b,t=np.int32)} for a,b in itertools.product(I32, repeat=2)])
run("RotaryEmbedding", [h.make_node("RotaryEmbedding", ["x","p","c","s"], ["y"], domain="com.microsoft")],
    [vi("x",T.FLOAT,[1,2,4]),vi("p",T.INT64,[1,2]),vi("c",T.FLOAT,[4,1]),vi("s",T.FLOAT,[4,1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,2,4),f),"p":A(a,b).reshape(1,2),"c":np.ones((4,1),f),"s":np.ones((4,1),f)} for a,b in itertools.product(I64, repeat=2)])
run("RotaryEmbedding p1", [h.make_node("RotaryEmbedding", ["x","p","c","s"], ["y"], domain="com.microsoft")],
    [vi("x",T.FLOAT,[1,2,4]),vi("p",T.INT64,[1]),vi("c",T.FLOAT,[4,1]),vi("s",T.FLOAT,[4,1])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,2,4),f),"p":A(a),"c":np.ones((4,1),f),"s":np.ones((4,1),f)} for a in I64])
run("RotaryEmbedding onnx23", [h.make_node("RotaryEmbedding", ["x","c","s","p"], ["y"])],
    [vi("x",T.FLOAT,[1,1,2,4]),vi("c",T.FLOAT,[4,2]),vi("s",T.FLOAT,[4,2]),vi("p",T.INT64,[1,2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,2,4),f),"c":np.ones((4,2),f),"s":np.ones((4,2),f),"p":A(a,b).reshape(1,2)} for a,b in itertools.product(I64, repeat=2)], opset=23)
run("CropAndResize", [h.make_node("CropAndResize", ["x","r","bi","cs"], ["y"], domain="com.microsoft")],
    [vi("x",T.FLOAT,[1,1,4,4]),vi("r",T.FLOAT,[1,4]),vi("bi",T.INT32,[1]),vi("cs",T.INT32,[2])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones((1,1,4,4),f),"r":np.array([[a,a,1,1]],f),"bi":A(b,t=np.int32),"cs":A(c,c,t=np.int32)} for a in [0,np.nan,1e30,-1e30] for b in I32 for c in [0,1,2,-1,2**30]])
run("Range float", [h.make_node("Range", ["a","b","c"], ["y"])], [vi("a",T.FLOAT,[]),vi("b",T.FLOAT,[]),vi("c",T.FLOAT,[])], [vi("y",T.FLOAT,None)],
    [{"a":np.array(a,f),"b":np.array(b,f),"c":np.array(c,f)} for a,b,c in itertools.product(F, repeat=3)])
run("Einsum", [h.make_node("Einsum", ["a","b"], ["y"], equation="ij,jk->ik")], [vi("a",T.FLOAT,[2,2]),vi("b",T.FLOAT,[2,2])], [vi("y",T.FLOAT,None)], [{"a":np.ones((2,2),f),"b":np.ones((2,2),f)}])
run("SequenceInsert/Erase", [h.make_node("SplitToSequence", ["x"], ["q"], keepdims=0), h.make_node("SequenceErase", ["q","p"], ["q2"]), h.make_node("SequenceInsert", ["q2","x0","p2"], ["q3"]), h.make_node("ConcatFromSequence", ["q3"], ["y"], axis=0)],
    [vi("x",T.FLOAT,[3]),vi("p",T.INT64,[]),vi("x0",T.FLOAT,[]),vi("p2",T.INT64,[])], [vi("y",T.FLOAT,None)],
    [{"x":np.ones(3,f),"p":np.array(a,np.int64),"x0":np.array(1,f),"p2":np.array(b,np.int64)} for a,b in itertools.product(I64, repeat=2)])
run("Shrink", [h.make_node("Shrink", ["x"], ["y"])], [vi("x",T.INT8,[2])], [vi("y",T.INT8,None)], [{"x":np.array([-128,127],np.int8)}])
for t, tt in [(np.int8,T.INT8),(np.int16,T.INT16),(np.int32,T.INT32),(np.int64,T.INT64)]:
    mn = np.iinfo(t).min
    run(f"Abs/Neg/Sign/Reduce {t.__name__}", [h.make_node("Abs", ["x"], ["a"]), h.make_node("Neg", ["x"], ["n"]), h.make_node("ReduceMean", ["x"], ["m"], keepdims=0)],
        [vi("x",tt,[2])], [vi("a",tt,None),vi("n",tt,None),vi("m",tt,None)], [{"x":np.array([mn,-1],t)}, {"x":np.array([mn,mn],t)}])
    run(f"Mean/Clip {t.__name__}", [h.make_node("Clip", ["x","lo","hi"], ["y"])], [vi("x",tt,[2]),vi("lo",tt,[]),vi("hi",tt,[])], [vi("y",tt,None)],
        [{"x":np.array([mn,-1],t),"lo":np.array(a,t),"hi":np.array(b,t)} for a,b in [(mn,-1),(0,mn),(1,0)]])
    run(f"ArgMax/CumSum {t.__name__}", [h.make_node("CumSum", ["x","ax"], ["y"], reverse=1, exclusive=1)], [vi("x",tt,[2]),vi("ax",T.INT64,[])], [vi("y",tt,None)],
        [{"x":np.array([mn,mn],t),"ax":np.array(0,np.int64)}])
for t, tt in [(np.int8, T.INT8), (np.int16, T.INT16), (np.int32, T.INT32), (np.int64, T.INT64),
               (np.uint32, T.UINT32), (np.uint64, T.UINT64)]:
    info = np.iinfo(t)
    vals = sorted({max(info.min, min(info.max, v)) for v in I64})
    for op, attrs in [("Div", {}), ("Mod", {"fmod": 0}), ("Mod", {"fmod": 1})]:
        run(f"{op} {attrs} {t.__name__}", [h.make_node(op, ["a", "b"], ["y"], **attrs)],
            [vi("a", tt, [1]), vi("b", tt, [1])], [vi("y", tt, None)],
            [{"a": np.array([a], t), "b": np.array([b], t)} for a, b in itertools.product(vals, repeat=2)])


print(f"killed the process: {', '.join(DIED) or 'none'}")
sys.exit(1 if DIED else 0)
