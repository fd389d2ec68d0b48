//! CUDA-against-CPU parity of the detection ops: runs each op on the same random inputs (drawn on the CPU from a
//! fixed seed, then copied) on the CPU and on a CUDA device and prints one JSON object with, per op, the largest
//! absolute difference (or the count of differing elements for integer and boolean results), its tolerance and
//! whether it passed. Exits 1 when an op fails, 2 when no CUDA device is present.
//!
//! `ops-check [--device cuda:N]` (default cuda:0).
//!
//! Ops and tolerances: RoIAlign forward and its input gradient (aligned and not, adaptive and fixed sampling;
//! 1e-4 absolute on unit-variance features), box IoU (1e-5), box encode (1e-4) and decode (1e-3 pixels on
//! boxes up to 1000 pixels), anchors (1e-3 pixels), NMS and batched NMS on both of torchvision's paths (kept
//! indices identical, in order), mask pasting in detectron2's way (boolean masks: at most 1e-4 of the pixels
//! may differ, from probabilities within rounding of the threshold) and in torchvision's way (probabilities,
//! 1e-5).

use std::process::ExitCode;

use detector::anchors::AnchorGenerator;
use detector::config::AnchorConfig;
use detector::ops::{batched_nms, box_iou, nms, paste_masks, paste_masks_torchvision, roi_align, BoxCoder};
use tch::{Device, Kind, Tensor};

/// One op's comparison.
struct Outcome {
    name: String,
    /// Largest absolute difference, or the number (or fraction) of differing elements.
    difference: f64,
    /// What `difference` must not exceed.
    tolerance: f64,
    /// What `difference` measures.
    metric: &'static str,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.difference.is_finite() && self.difference <= self.tolerance
    }

    fn json(&self) -> String {
        let number = |v: f64| if v.is_finite() { format!("{v}") } else { "null".into() };
        format!(
            "\"{}\": {{\"{}\": {}, \"tolerance\": {}, \"pass\": {}}}",
            self.name,
            self.metric,
            number(self.difference),
            number(self.tolerance),
            self.passed()
        )
    }
}

fn max_abs_diff(cpu: &Tensor, cuda: &Tensor) -> f64 {
    if cpu.size() != cuda.size() {
        return f64::INFINITY;
    }
    if cpu.numel() == 0 {
        return 0.0;
    }
    (cpu.to_kind(Kind::Double) - cuda.to_device(Device::Cpu).to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn close(name: &str, cpu: &Tensor, cuda: &Tensor, tolerance: f64) -> Outcome {
    Outcome { name: name.into(), difference: max_abs_diff(cpu, cuda), tolerance, metric: "max_abs_diff" }
}

/// Integer results (kept indices): the number of positions that differ (any length difference counts fully).
fn identical(name: &str, cpu: &Tensor, cuda: &Tensor) -> Outcome {
    let a = Vec::<i64>::try_from(cpu.to_kind(Kind::Int64)).unwrap_or_default();
    let b = Vec::<i64>::try_from(cuda.to_device(Device::Cpu).to_kind(Kind::Int64)).unwrap_or_default();
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
    Outcome { name: name.into(), difference: differing as f64, tolerance: 0.0, metric: "differing_indices" }
}

/// Random `[n, 4]` xyxy boxes inside a `width` x `height` image, at least 2 pixels wide and high.
fn random_boxes(n: i64, height: f64, width: f64) -> Tensor {
    let r = Tensor::rand([n, 4], (Kind::Float, Device::Cpu));
    let x1 = r.select(1, 0) * (width - 2.0);
    let y1 = r.select(1, 1) * (height - 2.0);
    let x2 = (&x1 + 2.0 + r.select(1, 2) * (width - 2.0)).clamp_max(width);
    let y2 = (&y1 + 2.0 + r.select(1, 3) * (height - 2.0)).clamp_max(height);
    Tensor::stack(&[x1, y1, x2, y2], 1)
}

fn roi_align_checks(cuda: Device) -> Vec<Outcome> {
    let input = Tensor::randn([2, 8, 40, 48], (Kind::Float, Device::Cpu));
    let boxes = random_boxes(64, 160.0, 192.0);
    let batch_index = Tensor::randint(2, [64, 1], (Kind::Float, Device::Cpu));
    let rois = Tensor::cat(&[batch_index, boxes], 1);
    let upstream = Tensor::randn([64, 8, 7, 7], (Kind::Float, Device::Cpu));
    let mut outcomes = Vec::new();
    for (aligned, sampling) in [(true, 0), (false, 2), (true, 2), (false, 0)] {
        let run = |device: Device| {
            // A leaf on each device (a copy of a leaf would not receive a gradient).
            let x = input.to_device(device).detach().set_requires_grad(true);
            let out = roi_align(&x, &rois.to_device(device), (7, 7), 0.25, sampling, aligned);
            (&out * upstream.to_device(device)).sum(Kind::Float).backward();
            (out.detach(), x.grad())
        };
        let (out_cpu, grad_cpu) = run(Device::Cpu);
        let (out_cuda, grad_cuda) = run(cuda);
        let tag = format!("aligned_{aligned}_sampling_{sampling}");
        outcomes.push(close(&format!("roi_align_forward_{tag}"), &out_cpu, &out_cuda, 1e-4));
        outcomes.push(close(&format!("roi_align_backward_{tag}"), &grad_cpu, &grad_cuda, 1e-4));
    }
    outcomes
}

fn box_checks(cuda: Device) -> Vec<Outcome> {
    let a = random_boxes(300, 800.0, 1000.0);
    let b = random_boxes(200, 800.0, 1000.0);
    let iou = close("box_iou", &box_iou(&a, &b), &box_iou(&a.to_device(cuda), &b.to_device(cuda)), 1e-5);
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let targets = random_boxes(300, 800.0, 1000.0);
    let encode = close(
        "box_encode",
        &coder.encode(&a, &targets),
        &coder.encode(&a.to_device(cuda), &targets.to_device(cuda)),
        1e-4,
    );
    let deltas = Tensor::randn([300, 4], (Kind::Float, Device::Cpu));
    let decode = close(
        "box_decode",
        &coder.decode(&deltas, &a),
        &coder.decode(&deltas.to_device(cuda), &a.to_device(cuda)),
        1e-3,
    );
    vec![iou, encode, decode]
}

fn anchor_checks(cuda: Device) -> Vec<Outcome> {
    let generator = AnchorGenerator::new(&AnchorConfig::default(), &[4, 8, 16, 32, 64]);
    let sizes = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)];
    let cpu = Tensor::cat(&generator.forward(&sizes, (800, 1344), Device::Cpu), 0);
    let on_cuda = Tensor::cat(&generator.forward(&sizes, (800, 1344), cuda), 0);
    vec![close("anchors", &cpu, &on_cuda, 1e-3)]
}

fn nms_checks(cuda: Device) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    // 500 boxes (2000 coordinates) take the offset path on both devices; 2000 boxes (8000 coordinates) take the
    // per-class path on the CPU and the offset path on CUDA, which must keep the same boxes.
    for n in [500, 2000] {
        let boxes = random_boxes(n, 200.0, 300.0);
        // Distinct scores, so that the order of the kept boxes is defined.
        let scores = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / n as f64;
        let groups = Tensor::randint(5, [n], (Kind::Int64, Device::Cpu));
        let (b, s, g) = (boxes.to_device(cuda), scores.to_device(cuda), groups.to_device(cuda));
        outcomes.push(identical(&format!("nms_{n}"), &nms(&boxes, &scores, 0.5), &nms(&b, &s, 0.5)));
        outcomes.push(identical(
            &format!("batched_nms_{n}"),
            &batched_nms(&boxes, &scores, &groups, 0.5),
            &batched_nms(&b, &s, &g, 0.5),
        ));
    }
    outcomes
}

fn paste_checks(cuda: Device) -> Vec<Outcome> {
    let (height, width) = (120, 160);
    let masks = Tensor::rand([30, 28, 28], (Kind::Float, Device::Cpu));
    let boxes = random_boxes(30, height as f64, width as f64);
    let cpu = paste_masks(&masks, &boxes, height, width, 0.5);
    let on_cuda = paste_masks(&masks.to_device(cuda), &boxes.to_device(cuda), height, width, 0.5);
    let differing = if cpu.size() == on_cuda.size() {
        cpu.ne_tensor(&on_cuda.to_device(Device::Cpu)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
    } else {
        f64::INFINITY
    };
    let detectron2 = Outcome {
        name: "paste_masks_detectron2".into(),
        difference: differing,
        tolerance: 1e-4,
        metric: "differing_pixel_fraction",
    };
    let torchvision = close(
        "paste_masks_torchvision",
        &paste_masks_torchvision(&masks, &boxes, height, width),
        &paste_masks_torchvision(&masks.to_device(cuda), &boxes.to_device(cuda), height, width),
        1e-5,
    );
    vec![detectron2, torchvision]
}

fn parse_device() -> Result<Device, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(Device::Cuda(0)),
        [flag, spec] if flag == "--device" => match spec.strip_prefix("cuda") {
            Some("") => Ok(Device::Cuda(0)),
            Some(index) => index
                .strip_prefix(':')
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("--device {spec}: expected cuda or cuda:N")),
            None => Err(format!("--device {spec}: expected cuda or cuda:N")),
        },
        _ => Err("usage: ops-check [--device cuda:N]".into()),
    }
}

fn main() -> ExitCode {
    let device = match parse_device() {
        Ok(device) => device,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let Device::Cuda(index) = device else { unreachable!("parse_device returns CUDA devices") };
    if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
        eprintln!(
            "error: ops-check compares CUDA with CPU results, but cuda:{index} is not available ({} CUDA devices)",
            tch::Cuda::device_count()
        );
        return ExitCode::from(2);
    }
    tch::manual_seed(0);
    let mut outcomes = roi_align_checks(device);
    outcomes.extend(box_checks(device));
    outcomes.extend(anchor_checks(device));
    outcomes.extend(nms_checks(device));
    outcomes.extend(paste_checks(device));
    let passed = outcomes.iter().all(Outcome::passed);
    let ops: Vec<String> = outcomes.iter().map(Outcome::json).collect();
    println!("{{\"device\": \"cuda:{index}\", \"pass\": {passed}, \"ops\": {{{}}}}}", ops.join(", "));
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
