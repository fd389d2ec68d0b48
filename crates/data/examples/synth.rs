//! Writes the synthetic dataset: `cargo run -p data --example synth -- OUT [TRAIN VAL SIZE SEED]`
//! (the same as `trainer data synth` once the CLI is wired).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().ok_or("usage: synth OUT [TRAIN VAL SIZE SEED]")?;
    let number = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
    let options = data::SynthOptions {
        train: number(1, 300)? as usize,
        val: number(2, 50)? as usize,
        size: number(3, 160)? as u32,
        seed: number(4, 0)?,
    };
    let summary = data::generate_synthetic(std::path::Path::new(out), &options)?;
    println!("wrote {out}: {} train and {} val instances", summary.instances.0, summary.instances.1);
    Ok(())
}
