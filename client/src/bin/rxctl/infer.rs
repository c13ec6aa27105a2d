//! `rxctl infer`: inputs from .npy files or generated, one request, outputs shown and written
//! as .npy files.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use rxd_client::protocol::{InferReply, ModelInfo, Tensor, TensorSpec};
use rxd_client::{ClientOptions, DType, blocking::Client, npy, tensor};

use crate::{Cli, Failure, Target, code, print_json};

/// `rxctl infer MODEL [--input NAME=FILE.npy]... [-o DIR]`.
#[derive(Debug, clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    target: Target,
    /// NAME=FILE.npy, once per input.
    #[arg(long = "input", short = 'i', value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Shape of a generated input, e.g. images=1x3x320x320 (default: the model's warmup
    /// shape, `rxctl models MODEL` shows it; without one, dynamic dimensions are 1).
    #[arg(long = "dim", value_name = "NAME=AxBx..")]
    dims: Vec<String>,
    /// Write each output to DIR/NAME.npy (created if missing). In NAME, every character
    /// but ASCII letters, digits, _ - and . (and a leading .) becomes %XX, so each output
    /// is one file inside DIR: save_infer_model/scale_0.tmp_1 →
    /// save_infer_model%2Fscale_0.tmp_1.npy.
    #[arg(long, short = 'o', value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Only these outputs (default: all).
    #[arg(long = "output", value_name = "NAME")]
    outputs: Vec<String>,
    /// Seed for generated inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn read_inputs(args: &[String]) -> Result<Vec<Tensor>, Failure> {
    let mut given = Vec::new();
    for arg in args {
        let (name, path) = arg
            .split_once('=')
            .ok_or_else(|| Failure(code::USAGE, format!("--input '{arg}' is not NAME=FILE.npy")))?;
        let file = std::fs::File::open(path)
            .map_err(|e| Failure(code::DATA, format!("cannot open {path}: {e}")))?;
        let t = npy::read(name, std::io::BufReader::new(file))
            .map_err(|e| Failure(code::DATA, format!("{path}: {e}")))?;
        given.push(t);
    }
    Ok(given)
}

/// `--dim NAME=AxBxC` flags, by input name.
pub fn parse_dims(args: &[String]) -> Result<BTreeMap<String, Vec<u64>>, Failure> {
    let mut dims = BTreeMap::new();
    for arg in args {
        let usage = || {
            Failure(
                code::USAGE,
                format!("--dim '{arg}' is not NAME=AxBx.. (e.g. images=1x3x320x320)"),
            )
        };
        let (name, shape) = arg.split_once('=').ok_or_else(usage)?;
        let shape: Vec<u64> = if shape.trim().is_empty() {
            Vec::new() // a scalar
        } else {
            shape
                .split(['x', 'X', ','])
                .map(|d| d.trim().parse::<u64>().map_err(|_| usage()))
                .collect::<Result<_, _>>()?
        };
        if dims.insert(name.to_string(), shape).is_some() {
            return Err(Failure(code::USAGE, format!("--dim names '{name}' twice")));
        }
    }
    Ok(dims)
}

/// A generated input: its shape and where the shape came from.
#[derive(Debug, serde::Serialize)]
pub struct Generated {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    /// `dim` (--dim), `warmup` (the shape the daemon warmed the model up with) or `ones`
    /// (no warmup shape known: dynamic dimensions are 1).
    pub shape_from: &'static str,
}

/// The shape of a generated input: `--dim`'s (checked against the model), else the model's
/// warmup shape, else its fixed dimensions with 1 for dynamic ones; `rows` replaces a
/// dynamic first dimension (`generate` allows it only where every input has one).
fn generated_shape(
    spec: &TensorSpec,
    flag: Option<&Vec<u64>>,
    rows: Option<u64>,
) -> Result<(Vec<u64>, &'static str), Failure> {
    let (mut shape, from) = match flag {
        Some(shape) => {
            if !spec.fits(shape) {
                return Err(Failure(
                    code::USAGE,
                    format!(
                        "--dim {}: the input's shape is {}, not {shape:?}",
                        spec.name,
                        spec.dims_text()
                    ),
                ));
            }
            (shape.clone(), "dim")
        }
        None if spec.warmup_dims.len() == spec.dims.len() && !spec.dims.is_empty() => {
            (spec.warmup_dims.clone(), "warmup")
        }
        None if spec.dims.iter().all(|&d| d >= 0) => {
            (spec.dims.iter().map(|&d| d as u64).collect(), "fixed")
        }
        None => (
            spec.dims
                .iter()
                .map(|&d| if d < 0 { 1 } else { d as u64 })
                .collect(),
            "ones",
        ),
    };
    if let (Some(rows), Some(-1)) = (rows, spec.dims.first()) {
        shape[0] = rows;
    }
    for (i, (&got, &max)) in shape.iter().zip(&spec.max_dims).enumerate() {
        if got > max {
            return Err(Failure(
                code::USAGE,
                format!(
                    "{}: dimension {i} of {shape:?} is over the model's limit {:?} \
                     (model.toml max-dims)",
                    spec.name, spec.max_dims
                ),
            ));
        }
    }
    if shape.contains(&0) {
        return Err(Failure(
            code::USAGE,
            format!("{}: {shape:?} has a zero-sized dimension", spec.name),
        ));
    }
    Ok((shape, from))
}

/// Adds a random input for every input of the model that `given` lacks; returns what was
/// generated. `--dim` may only name inputs that are generated.
pub fn generate(
    info: &ModelInfo,
    given: &mut Vec<Tensor>,
    dims: &BTreeMap<String, Vec<u64>>,
    rows: Option<u64>,
    seed: u64,
) -> Result<Vec<Generated>, Failure> {
    for name in dims.keys() {
        if given.iter().any(|t| &t.name == name) {
            return Err(Failure(
                code::USAGE,
                format!("--dim {name}: that input is given by --input"),
            ));
        }
        if !info.inputs.iter().any(|s| &s.name == name) {
            let names: Vec<&str> = info.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(Failure(
                code::USAGE,
                format!(
                    "--dim {name}: {} has no such input (its inputs: {})",
                    info.summary.name,
                    names.join(", ")
                ),
            ));
        }
    }
    // Rows are the first dimension of every input only when every input has a dynamic first
    // dimension (the daemon's rule for batching). Elsewhere (Silero's `state` is [2, batch,
    // 128], `sr` a scalar) setting the first dimension alone makes inputs of different batch
    // sizes, which the model refuses on every request.
    if rows.is_some()
        && let Some(odd) = info.inputs.iter().find(|s| s.dims.first() != Some(&-1))
    {
        return Err(Failure(
            code::USAGE,
            format!(
                "--rows: {}'s input '{}' ({}) does not have its rows as a dynamic first \
                 dimension; give each input's shape with --dim instead",
                info.summary.name,
                odd.name,
                odd.dims_text()
            ),
        ));
    }
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut generated = Vec::new();
    for spec in &info.inputs {
        if given.iter().any(|t| t.name == spec.name) {
            continue;
        }
        let (shape, from) = generated_shape(spec, dims.get(&spec.name), rows)?;
        given.push(random_input(spec, &shape, &mut rng));
        generated.push(Generated {
            name: spec.name.clone(),
            dtype: spec.dtype.name(),
            shape,
            shape_from: from,
        });
    }
    Ok(generated)
}

/// Says which inputs were random, and of what shape (text output).
pub fn generated_text(generated: &[Generated]) -> Option<String> {
    if generated.is_empty() {
        return None;
    }
    let items: Vec<String> = generated
        .iter()
        .map(|g| {
            let shape: Vec<String> = g.shape.iter().map(u64::to_string).collect();
            format!("{} {} [{}]", g.name, g.dtype, shape.join(", "))
        })
        .collect();
    let why = if generated.iter().any(|g| g.shape_from == "ones") {
        "no warmup shape is known for some: their dynamic dimensions are 1 \
         (--dim NAME=AxB.. sets a shape; model.toml warmup-dims gives the model one)"
    } else if generated.iter().any(|g| g.shape_from == "warmup") {
        "the shapes the daemon warmed the model up with; --dim NAME=AxB.. changes them"
    } else {
        "--input NAME=FILE.npy gives real ones"
    };
    Some(format!("random inputs: {} ({why})", items.join(", ")))
}

pub fn infer(cli: &Cli, args: &InferArgs) -> Result<u8, Failure> {
    let (model, version) = (&args.target.model, args.target.version);
    let (output_dir, wanted) = (args.output_dir.as_ref(), &args.outputs);
    if let Some(dir) = output_dir {
        if dir.exists() && !dir.is_dir() {
            return Err(Failure(
                code::USAGE,
                format!(
                    "-o {}: that is a file; -o names a directory (each output is written to \
                     DIR/NAME.npy)",
                    dir.display()
                ),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure(code::IO, format!("{}: {e}", dir.display())))?;
    }
    let mut given = read_inputs(&args.inputs)?;
    let dims = parse_dims(&args.dims)?;
    let info = cli.connect()?.model_info(model, version)?;
    let generated = generate(&info, &mut given, &dims, None, args.seed)?;
    // An arena sized for the inputs large enough to go through it and for the outputs, where
    // their size is known before the run (the library places both; outputs that do not fit
    // come inline).
    let options = ClientOptions::default();
    let input_bytes: u64 = given
        .iter()
        .filter_map(tensor::bytes)
        .map(|b| (b.len() as u64).next_multiple_of(64))
        .filter(|&n| n >= options.inline_threshold)
        .sum();
    let output_bytes = rxd_client::shapes::output_area_bytes(&info, &given, wanted)
        .filter(|&n| n >= options.inline_threshold)
        .unwrap_or(0);
    let options = ClientOptions {
        arena_bytes: match input_bytes + output_bytes {
            0 => 0,
            n => n + (64 << 10),
        },
        ..options
    };
    let client = Client::connect_with(&cli.socket, options)?;
    let hint = |f: Failure| -> Failure {
        if f.0 == code::SERVER_ERROR && generated.iter().any(|g| g.shape_from == "ones") {
            Failure(
                f.0,
                format!(
                    "{} (inputs were generated with dynamic dimensions of 1: give a shape with \
                     --dim NAME=AxB.., or real inputs with --input NAME=FILE.npy)",
                    f.1
                ),
            )
        } else {
            f
        }
    };
    let mut req = rxd_client::protocol::InferRequest::new(model, given);
    req.version = version;
    req.outputs = wanted.to_vec();
    let reply = client.infer_with(req).map_err(|e| hint(e.into()))?;
    let mut files = Vec::new();
    if let Some(dir) = output_dir {
        for t in &reply.outputs {
            let path = dir.join(npy::file_name(&t.name));
            let f = std::fs::File::create(&path)
                .map_err(|e| Failure(code::IO, format!("{}: {e}", path.display())))?;
            npy::write(t, std::io::BufWriter::new(f))
                .map_err(|e| Failure(code::IO, format!("{}: {e}", path.display())))?;
            files.push(path);
        }
    }
    if cli.json {
        let outs: Vec<serde_json::Value> = reply
            .outputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut v = serde_json::json!({
                    "name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                    "values": preview(t, usize::MAX),
                });
                if let (Some(path), Some(map)) = (files.get(i), v.as_object_mut()) {
                    map.insert("file".into(), path.display().to_string().into());
                }
                v
            })
            .collect();
        print_json(&serde_json::json!({
            "model": reply.model,
            "version": reply.version,
            "generated_inputs": generated,
            "outputs": outs,
        }));
    } else {
        let written = output_dir.map(|dir| (dir.as_path(), files.as_slice()));
        out!("{}", reply_text(&reply, &generated, written));
    }
    Ok(0)
}

/// `rxctl infer`'s text: which inputs were random, each output's first values, and where the
/// outputs were written (`written`: the directory and the files).
pub fn reply_text(
    reply: &InferReply,
    generated: &[Generated],
    written: Option<(&Path, &[PathBuf])>,
) -> String {
    let mut o = String::new();
    if let Some(text) = generated_text(generated) {
        let _ = writeln!(o, "{text}");
    }
    let _ = writeln!(o, "{} version {}:", reply.model, reply.version);
    for t in &reply.outputs {
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        let values: Vec<String> = preview(t, 10).iter().map(human_number).collect();
        let more = if t.shape.iter().product::<u64>() > 10 {
            ", ..."
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "  {} {} [{}] = [{}{more}]",
            t.name,
            t.dtype.name(),
            shape.join(", "),
            values.join(", ")
        );
    }
    if let Some((dir, files)) = written {
        let names: Vec<String> = files
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let _ = writeln!(
            o,
            "outputs written to {}: {}",
            dir.display(),
            names.join(", ")
        );
    }
    o
}

fn human_number(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && x != 0.0 && !(1e-3..1e6).contains(&x.abs()) => format!("{x:.3e}"),
        Some(x) if v.is_f64() => format!("{x:.4}"),
        _ => v.to_string(),
    }
}

/// Random data of `shape` for an input: floats in [0, 1), integers in 0..10, booleans — but
/// an integer input the model compares with a constant (`warmup_value`, such as a sample
/// rate) gets that value everywhere: a random one would take a branch real inputs do not.
fn random_input(spec: &TensorSpec, shape: &[u64], rng: &mut u64) -> Tensor {
    let shape = shape.to_vec();
    let n = shape.iter().product::<u64>() as usize;
    if let Some(one) = spec.warmup_value.and_then(|v| spec.dtype.integer_bytes(v)) {
        return Tensor::inline(spec.name.clone(), spec.dtype, shape, one.repeat(n));
    }
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut bytes = Vec::new();
    for _ in 0..n {
        let r = next();
        let unit = (r >> 40) as f32 / (1u64 << 24) as f32;
        match spec.dtype {
            DType::Float32 => bytes.extend_from_slice(&unit.to_le_bytes()),
            DType::Float64 => bytes.extend_from_slice(&f64::from(unit).to_le_bytes()),
            DType::Bool => bytes.push((r & 1) as u8),
            d => {
                let v = (r % 10).to_le_bytes();
                let size = (d.bits() / 8).max(1) as usize;
                bytes.extend_from_slice(&v[..size.min(8)]);
                bytes.resize(bytes.len() + size.saturating_sub(8), 0);
            }
        }
    }
    let len = spec.dtype.byte_len(n as u64).unwrap_or(0) as usize;
    bytes.resize(len, 0);
    Tensor::inline(spec.name.clone(), spec.dtype, shape, bytes)
}

/// The first `max` values of a tensor as JSON numbers (empty for dtypes without a preview).
fn preview(t: &Tensor, max: usize) -> Vec<serde_json::Value> {
    fn take<T: tensor::Element + Into<serde_json::Value>>(
        t: &Tensor,
        max: usize,
    ) -> Vec<serde_json::Value> {
        tensor::to_array::<T>(t)
            .map(|a| a.iter().take(max).map(|&x| x.into()).collect())
            .unwrap_or_default()
    }
    match t.dtype {
        DType::Float32 => take::<f32>(t, max),
        DType::Float64 => take::<f64>(t, max),
        DType::Int8 => take::<i8>(t, max),
        DType::Int16 => take::<i16>(t, max),
        DType::Int32 => take::<i32>(t, max),
        DType::Int64 => take::<i64>(t, max),
        DType::Uint8 => take::<u8>(t, max),
        DType::Uint16 => take::<u16>(t, max),
        DType::Uint32 => take::<u32>(t, max),
        DType::Uint64 => take::<u64>(t, max),
        DType::Bool => take::<bool>(t, max),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(from: &'static str) -> Generated {
        Generated {
            name: "images".into(),
            dtype: "float32",
            shape: vec![1, 3, 320, 320],
            shape_from: from,
        }
    }

    #[test]
    fn generated_inputs_are_named_with_their_shape_and_where_it_came_from() {
        assert_eq!(generated_text(&[]), None);
        assert_eq!(
            generated_text(&[generated("warmup")]).unwrap(),
            "random inputs: images float32 [1, 3, 320, 320] (the shapes the daemon warmed the \
             model up with; --dim NAME=AxB.. changes them)"
        );
        let ones = generated_text(&[generated("ones")]).unwrap();
        assert!(ones.contains("their dynamic dimensions are 1"), "{ones}");
        let dim = generated_text(&[generated("dim")]).unwrap();
        assert!(
            dim.ends_with("(--input NAME=FILE.npy gives real ones)"),
            "{dim}"
        );
    }

    #[test]
    fn the_reply_shows_ten_values_of_each_output_and_where_they_were_written() {
        let values: Vec<u8> = (0..12)
            .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
            .collect();
        let label = 7i64.to_le_bytes().to_vec();
        let reply = InferReply {
            model: "digits".into(),
            version: 2,
            outputs: vec![
                Tensor::inline("probs", DType::Float32, vec![1, 12], values),
                Tensor::inline("label", DType::Int64, vec![1], label),
            ],
        };
        let files = [
            PathBuf::from("out/probs.npy"),
            PathBuf::from("out/label.npy"),
        ];
        let text = reply_text(
            &reply,
            &[generated("warmup")],
            Some((Path::new("out"), &files)),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("random inputs: images"), "{text}");
        assert_eq!(lines[1], "digits version 2:");
        assert_eq!(
            lines[2],
            "  probs float32 [1, 12] = [0.0000, 0.5000, 1.0000, 1.5000, 2.0000, 2.5000, \
             3.0000, 3.5000, 4.0000, 4.5000, ...]"
        );
        assert_eq!(lines[3], "  label int64 [1] = [7]");
        assert_eq!(lines[4], "outputs written to out: probs.npy, label.npy");
        assert_eq!(lines.len(), 5, "{text}");
        assert!(!reply_text(&reply, &[], None).contains("random"));
    }

    #[test]
    fn numbers_are_shown_for_people() {
        assert_eq!(human_number(&serde_json::json!(0.5)), "0.5000");
        assert_eq!(human_number(&serde_json::json!(1.5e-5)), "1.500e-5");
        assert_eq!(human_number(&serde_json::json!(0.0)), "0.0000");
        assert_eq!(human_number(&serde_json::json!(3)), "3");
    }
}
