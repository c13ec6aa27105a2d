//! Round trips of one blocking client: runs a float32 model on the same-shaped input again
//! and again and prints the latency percentiles as JSON — the Rust blocking client's figure
//! next to the Python client's in `scripts/bench python`.
//!
//! `cargo run --release -p rxd-client --example roundtrip -- SOCKET MODEL INPUT DIMS N`
//! (DIMS like `3x4x5`).

use std::time::Instant;

use rxd_client::blocking::Client;
use rxd_client::ndarray::{ArrayD, IxDyn};
use rxd_client::tensor::from_array;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, model, input, dims, n] = &args[..] else {
        return Err("usage: roundtrip SOCKET MODEL INPUT DIMS N".into());
    };
    let dims: Vec<usize> = dims.split('x').map(str::parse).collect::<Result<_, _>>()?;
    let n: usize = n.parse()?;
    let client = Client::connect(socket)?;
    let len: usize = dims.iter().product();
    let mut x = ArrayD::<f32>::from_shape_vec(
        IxDyn(&dims),
        (0..len).map(|k| (k % 7) as f32 / 7.0).collect(),
    )?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        x.as_slice_mut().ok_or("not contiguous")?[0] = (i % 97) as f32; // a new request each time
        let t = Instant::now();
        client.infer(model, vec![from_array(input, &x)])?;
        if i >= n / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{{\"p50_us\": {:.1}, \"p99_us\": {:.1}}}",
        at(0.5),
        at(0.99)
    );
    Ok(())
}
