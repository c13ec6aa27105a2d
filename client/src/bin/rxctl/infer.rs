//! `rxctl infer`: inputs from .npy files or generated, one request, outputs shown and written
//! as .npy files.

use std::path::PathBuf;

use rxd_client::protocol::{Tensor, TensorSpec};
use rxd_client::{ClientOptions, DType, blocking::Client, npy, tensor};

use crate::{Cli, Failure, code, print_json};

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

#[allow(clippy::too_many_arguments)]
pub fn infer(
    cli: &Cli,
    model: &str,
    version: Option<u64>,
    input_args: &[String],
    output_dir: Option<&PathBuf>,
    wanted: &[String],
    seed: u64,
) -> Result<u8, Failure> {
    let mut given = read_inputs(input_args)?;
    // Inputs large enough go through a shared-memory arena sized for them (the library decides
    // per tensor); outputs come back inline.
    let options = ClientOptions::default();
    let input_bytes: u64 = given
        .iter()
        .filter_map(tensor::bytes)
        .map(|b| (b.len() as u64).next_multiple_of(64))
        .filter(|&n| n >= options.inline_threshold)
        .sum();
    let options = ClientOptions {
        arena_bytes: if input_bytes > 0 {
            input_bytes + (1 << 20)
        } else {
            0
        },
        ..options
    };
    let client = Client::connect_with(&cli.socket, options)?;
    let info = client.model_info(model, version)?;
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for spec in &info.inputs {
        if !given.iter().any(|t| t.name == spec.name) {
            given.push(random_input(spec, &mut rng));
        }
    }
    let reply = if version.is_none() && wanted.is_empty() {
        let outputs = client.infer(model, given)?;
        rxd_client::protocol::InferReply {
            model: model.into(),
            version: info.summary.version,
            outputs,
        }
    } else {
        let mut req = rxd_client::protocol::InferRequest::new(model, given);
        req.version = version;
        req.outputs = wanted.to_vec();
        client.infer_request(req)?
    };
    if let Some(dir) = output_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure(code::IO, format!("{}: {e}", dir.display())))?;
        for t in &reply.outputs {
            let path = dir.join(format!("{}.npy", t.name));
            let f = std::fs::File::create(&path)
                .map_err(|e| Failure(code::IO, format!("{}: {e}", path.display())))?;
            npy::write(t, std::io::BufWriter::new(f))
                .map_err(|e| Failure(code::IO, format!("{}: {e}", path.display())))?;
        }
    }
    if cli.json {
        let outs: Vec<serde_json::Value> = reply
            .outputs
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                    "values": preview(t, usize::MAX),
                })
            })
            .collect();
        print_json(
            &serde_json::json!({"model": reply.model, "version": reply.version, "outputs": outs}),
        );
    } else {
        println!("{} version {}:", reply.model, reply.version);
        for t in &reply.outputs {
            let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            let values: Vec<String> = preview(t, 10).iter().map(human_number).collect();
            let more = if t.shape.iter().product::<u64>() > 10 {
                ", ..."
            } else {
                ""
            };
            println!(
                "  {} {} [{}] = [{}{more}]",
                t.name,
                t.dtype.name(),
                shape.join(", "),
                values.join(", ")
            );
        }
        if let Some(dir) = output_dir {
            println!("outputs written to {}", dir.display());
        }
    }
    Ok(0)
}

fn human_number(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && x != 0.0 && !(1e-3..1e6).contains(&x.abs()) => format!("{x:.3e}"),
        Some(x) if v.is_f64() => format!("{x:.4}"),
        _ => v.to_string(),
    }
}

/// Random data for an input: floats in [0, 1), integers in 0..10, booleans.
pub fn random_input(spec: &TensorSpec, rng: &mut u64) -> Tensor {
    let shape: Vec<u64> = spec
        .dims
        .iter()
        .map(|&d| if d < 0 { 1 } else { d as u64 })
        .collect();
    let n = shape.iter().product::<u64>() as usize;
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
