//! `trainer info`: parameter counts per top-level module, GFLOPs at a given input size, and each backbone
//! output's channels and spatial size.

use std::collections::BTreeMap;

use anyhow::Context;
use detector::structures::ImageBatch;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::distributed::RankGroup;
use crate::model::build_model;

/// What `trainer info` reports.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    /// Trainable-parameter counts by top-level module (`backbone`, ...) and `total`; BatchNorm statistics and
    /// FrozenBN constants are buffers, not parameters, as in PyTorch.
    pub params: BTreeMap<String, i64>,
    /// Multiply-accumulates (fvcore's "FLOPs") of one inference pass at `input`, in units of 1e9: the whole model
    /// on a blank image (backbone, FPN, RPN, and the box head on the test-time proposals; the mask head runs only
    /// on detections, which a blank image does not produce).
    pub gflops: f64,
    /// The backbone's share of `gflops`.
    pub gflops_backbone: f64,
    /// Input size `[height, width]` the FLOPs and feature shapes refer to.
    pub input: [i64; 2],
    /// Every backbone output as `[channels, height, width]`.
    pub features: BTreeMap<String, [i64; 3]>,
}

/// Parses `HxW` (e.g. `800x1344`).
pub fn parse_size(text: &str) -> anyhow::Result<[i64; 2]> {
    let parse = || -> Option<[i64; 2]> {
        let (h, w) = text.split_once(['x', 'X'])?;
        let size = [h.trim().parse().ok()?, w.trim().parse().ok()?];
        (size[0] > 0 && size[1] > 0).then_some(size)
    };
    parse().with_context(|| format!("size `{text}`: expected HEIGHTxWIDTH with positive integers, e.g. 800x1344"))
}

/// Counts parameters per top-level module and runs one forward pass at `input` to count FLOPs and shapes.
pub fn model_info(config: &Config, input: [i64; 2], device: Device) -> anyhow::Result<ModelInfo> {
    let model = build_model(config, device, &RankGroup::single())?;
    let mut params = BTreeMap::new();
    let mut total = 0;
    for (name, tensor) in model.vs.variables() {
        if tensor.requires_grad() {
            let module = name.split('.').next().unwrap_or_default().to_string();
            *params.entry(module).or_insert(0) += tensor.numel() as i64;
            total += tensor.numel() as i64;
        }
    }
    params.insert("total".into(), total);
    let image = Tensor::zeros([1, 3, input[0], input[1]], (Kind::Float, device));
    let (outputs, backbone_macs) =
        backbone::flops::count_macs(|| tch::no_grad(|| model.backbone().forward_t(&image, false)));
    let batch = ImageBatch { images: image.shallow_clone(), image_sizes: vec![(input[0], input[1])] };
    let (detections, macs) = backbone::flops::count_macs(|| model.model.inference(&batch, &batch.image_sizes));
    detections?;
    let features = model
        .backbone()
        .output_specs()
        .iter()
        .zip(&outputs)
        .map(|(spec, out)| {
            let s = out.size();
            (spec.name.clone(), [s[1], s[2], s[3]])
        })
        .collect();
    Ok(ModelInfo { params, gflops: macs as f64 / 1e9, gflops_backbone: backbone_macs as f64 / 1e9, input, features })
}

/// Formats the report for people.
pub fn render(info: &ModelInfo) -> String {
    let mut out = String::from("parameters\n");
    for (module, count) in &info.params {
        out.push_str(&format!("  {module:<12} {count:>12}  ({:.2}M)\n", *count as f64 / 1e6));
    }
    out.push_str(&format!(
        "GFLOPs at {}x{}: {:.2} (multiply-accumulates)\n",
        info.input[0], info.input[1], info.gflops
    ));
    out.push_str("features\n");
    for (name, [c, h, w]) in &info.features {
        out.push_str(&format!("  {name:<8} {c:>5} x {h:>4} x {w:>4}\n"));
    }
    out
}
