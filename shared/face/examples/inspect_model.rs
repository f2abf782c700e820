//! Prints the operators of a model after tract's optimisation, with counts: to see what a model
//! becomes before tuning it. `cargo run -p face --example inspect_model -- sface`.
//!
//! With a number of passes after the model (`-- yunet 50`), it also runs the plan that many times
//! on one thread and prints where the time goes: per kind of operator, then the slowest nodes with
//! what tract says of them. Build with `--release` for meaningful numbers. For YuNet, an image after
//! the passes (`-- yunet 50 photo.jpg`) sets the input's size as the detector would see it.

use std::{collections::BTreeMap, time::Instant};

use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "sface".into());
    let passes: usize = std::env::args()
        .nth(2)
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(0);
    let dir = face::models::default_models_dir();
    let (file, shape) = match which.as_str() {
        "sface" => (face::models::SFACE, [1, 3, 112, 112]),
        "fas" => (face::models::FAS_V2, [1, 3, 80, 80]),
        "fas-v1se" => (face::models::FAS_V1SE, [1, 3, 80, 80]),
        _ => match std::env::args().nth(3) {
            // The detector's input for that image, as `face::detect` sizes it.
            Some(image) => {
                let img = face::decode::decode_rgb(&std::fs::read(image)?)?;
                let size = face::detect::input_size(img.width(), img.height(), 320);
                (face::models::YUNET, [1, 3, size.pad_h, size.pad_w])
            }
            None => (face::models::YUNET, [1, 3, 256, 320]),
        },
    };
    let plan = face::models::load_plan(&face::models::read_checked(&dir, file)?, shape)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for node in plan.model().nodes() {
        *counts.entry(node.op().name().to_string()).or_default() += 1;
    }
    for (op, n) in &counts {
        println!("{n:>4} {op}");
    }
    if passes == 0 {
        return Ok(());
    }
    // A fixed, non-trivial input: the timings do not depend on the values.
    let input: Tensor = tract_ndarray::Array4::<f32>::from_shape_fn(shape, |(_, c, y, x)| {
        ((c * 31 + y * 7 + x * 3) % 255) as f32
    })
    .into();
    let mut per_node = vec![0f64; plan.model().nodes().len()];
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan)?;
    let started = Instant::now();
    for _ in 0..passes {
        state.run_plan_with_eval(
            tvec!(input.clone().into_tvalue()),
            |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                per_node[node.id] += t.elapsed().as_secs_f64();
                out
            },
        )?;
    }
    let total = started.elapsed().as_secs_f64() * 1000.0 / passes as f64;
    let ms = |s: f64| s * 1000.0 / passes as f64;
    let mut per_op: BTreeMap<String, f64> = BTreeMap::new();
    for node in plan.model().nodes() {
        *per_op.entry(node.op().name().to_string()).or_default() += per_node[node.id];
    }
    let mut per_op: Vec<_> = per_op.into_iter().collect();
    per_op.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("\n{passes} passes, {total:.2} ms per pass; per kind of operator (ms per pass):");
    for (op, s) in &per_op {
        println!("{:>8.3} {:>4}x {op}", ms(*s), counts[op]);
    }
    let mut nodes: Vec<_> = plan.model().nodes().iter().collect();
    nodes.sort_by(|a, b| per_node[b.id].total_cmp(&per_node[a.id]));
    println!("\nslowest nodes (ms per pass):");
    for node in nodes.iter().take(25) {
        let facts = plan.model().node_output_facts(node.id)?;
        let info = node.op().info()?.join("; ");
        println!(
            "{:>8.3} {} {} -> {:?} {}",
            ms(per_node[node.id]),
            node.op().name(),
            node.name,
            facts.first().map(|f| format!("{:?}", f.shape)),
            info.chars().take(160).collect::<String>()
        );
    }
    Ok(())
}
