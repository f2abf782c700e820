//! Prints the operators of a model after tract's optimisation, with counts: to see what a model
//! becomes before tuning it. `cargo run -p face --example inspect_model -- sface`.

use std::collections::BTreeMap;

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "sface".into());
    let dir = face::models::default_models_dir();
    let (file, shape) = match which.as_str() {
        "sface" => (face::models::SFACE, [1, 3, 112, 112]),
        "fas" => (face::models::FAS_V2, [1, 3, 80, 80]),
        _ => (face::models::YUNET, [1, 3, 256, 320]),
    };
    let plan = face::models::load_plan(&face::models::read_checked(&dir, file)?, shape)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for node in plan.model().nodes() {
        *counts.entry(node.op().name().to_string()).or_default() += 1;
    }
    for (op, n) in counts {
        println!("{n:>4} {op}");
    }
    Ok(())
}
