//! Unit tests of the detection ops that have no torchvision counterpart: box coder, matcher, sampler, box helpers.

use detector::ops::{self, BoxCoder, Matcher, MatcherError};
use tch::{Kind, Tensor};

fn tensor2(rows: &[[f64; 4]]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_slice(&flat).reshape([rows.len() as i64, 4])
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64)).expect("i64 values")
}

#[test]
fn box_coder_round_trip_and_known_deltas() {
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let src = tensor2(&[[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 45.0, 25.0], [100.0, 50.0, 103.0, 90.0]]);
    let target = tensor2(&[[2.0, 4.0, 14.0, 20.0], [0.0, 0.0, 80.0, 40.0], [101.0, 49.0, 104.0, 95.0]]);
    let deltas = coder.encode(&src, &target);
    // First pair by hand: centres (5, 10) -> (8, 12), sizes (10, 20) -> (12, 16).
    let expected = [10.0 * 3.0 / 10.0, 10.0 * 2.0 / 20.0, 5.0 * (12.0f64 / 10.0).ln(), 5.0 * (16.0f64 / 20.0).ln()];
    let first = Vec::<f32>::try_from(deltas.get(0)).expect("deltas");
    for (got, want) in first.iter().zip(expected) {
        assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
    }
    let decoded = coder.decode(&deltas, &src);
    assert!(max_diff(&decoded, &target) < 1e-4, "round trip error {}", max_diff(&decoded, &target));
}

#[test]
fn box_coder_decodes_class_specific_deltas_and_clamps_scale() {
    let coder = BoxCoder::new([1.0, 1.0, 1.0, 1.0]);
    let boxes = tensor2(&[[0.0, 0.0, 16.0, 16.0], [10.0, 10.0, 20.0, 30.0]]);
    // Three classes: zero deltas, a shift, and a huge dw/dh that must be clamped to ln(1000/16).
    let deltas = Tensor::from_slice(&[
        0.0f32, 0.0, 0.0, 0.0, 0.5, -0.25, 0.0, 0.0, 0.0, 0.0, 50.0, 50.0, //
        0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0, -1.0,
    ])
    .reshape([2, 12]);
    let decoded = coder.decode(&deltas, &boxes);
    assert_eq!(decoded.size(), vec![2, 12]);
    assert!(max_diff(&decoded.narrow(1, 0, 4), &boxes) < 1e-5, "zero deltas keep the box");
    let shifted = tensor2(&[[8.0, -4.0, 24.0, 12.0], [20.0, 10.0, 30.0, 30.0]]);
    assert!(max_diff(&decoded.narrow(1, 4, 4), &shifted) < 1e-5);
    // Box 0, class 2: width 16 * 1000/16 = 1000 around centre 8.
    let clamped = Vec::<f32>::try_from(decoded.get(0).narrow(0, 8, 4)).expect("clamped box");
    let expected = [8.0 - 500.0, 8.0 - 500.0, 8.0 + 500.0, 8.0 + 500.0];
    for (got, want) in clamped.iter().zip(expected) {
        assert!((f64::from(*got) - want).abs() < 1e-2, "{got} vs {want}");
    }
    assert!(decoded.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn matcher_thresholds_and_low_quality_matches() {
    // RPN-style matcher: [0, 0.3) background, [0.3, 0.7) ignored, >= 0.7 foreground.
    let iou = Tensor::from_slice(&[
        0.9f32, 0.1, 0.4, 0.0, 0.2, //
        0.1, 0.65, 0.3, 0.0, 0.2, //
    ])
    .reshape([2, 5]);
    let plain = Matcher::new(vec![0.3, 0.7], vec![0, -1, 1], false).expect("valid matcher");
    let (matched, labels) = plain.match_quality(&iou);
    assert_eq!(to_vec_i64(&matched), vec![0, 1, 0, 0, 0]);
    assert_eq!(to_vec_i64(&labels), vec![1, -1, -1, 0, 0]);
    let low_quality = Matcher::new(vec![0.3, 0.7], vec![0, -1, 1], true).expect("valid matcher");
    let (_, labels) = low_quality.match_quality(&iou);
    // Prediction 1 is ground truth 1's best match (0.65): promoted to foreground.
    assert_eq!(to_vec_i64(&labels), vec![1, 1, -1, 0, 0]);
    // Ties for a ground truth's best IoU are all promoted.
    let tied = Tensor::from_slice(&[0.5f32, 0.5, 0.1]).reshape([1, 3]);
    let (_, labels) = low_quality.match_quality(&tied);
    assert_eq!(to_vec_i64(&labels), vec![1, 1, 0]);
}

#[test]
fn matcher_without_ground_truth_is_all_background() {
    let matcher = Matcher::new(vec![0.5], vec![0, 1], false).expect("valid matcher");
    let (matched, labels) = matcher.match_quality(&Tensor::zeros([0, 7], (Kind::Float, tch::Device::Cpu)));
    assert_eq!(to_vec_i64(&matched), vec![0; 7]);
    assert_eq!(to_vec_i64(&labels), vec![0; 7]);
    let (matched, labels) = matcher.match_quality(&Tensor::zeros([3, 0], (Kind::Float, tch::Device::Cpu)));
    assert_eq!((matched.size(), labels.size()), (vec![0], vec![0]));
}

#[test]
fn matcher_rejects_bad_configurations() {
    assert_eq!(
        Matcher::new(vec![0.7, 0.3], vec![0, -1, 1], false),
        Err(MatcherError::UnsortedThresholds(vec![0.7, 0.3]))
    );
    assert_eq!(
        Matcher::new(vec![0.5], vec![0, -1, 1], false),
        Err(MatcherError::LabelCount { thresholds: 1, expected: 2, got: 3 })
    );
    assert_eq!(Matcher::new(vec![0.5], vec![0, 2], false), Err(MatcherError::InvalidLabel(2)));
}

/// Held by the sampler tests: they seed libtorch's one global RNG and must not interleave.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 30 positives (class labels 1..3), 100 negatives (background 0), 20 ignored (-1).
fn sampler_labels() -> Tensor {
    let mut values = vec![1i64; 10];
    values.extend([2; 10]);
    values.extend([3; 10]);
    values.extend([0; 100]);
    values.extend([-1; 20]);
    Tensor::from_slice(&values)
}

/// Sampled candidates of a draw: (positives, negatives) as index lists, from the valid slots.
fn drawn(sample: &ops::BalancedSample) -> (Vec<i64>, Vec<i64>) {
    let index = to_vec_i64(&sample.index);
    let positive = Vec::<bool>::try_from(&sample.positive).unwrap();
    let valid = Vec::<bool>::try_from(&sample.valid).unwrap();
    let mut split = (Vec::new(), Vec::new());
    for ((&i, &p), &v) in index.iter().zip(&positive).zip(&valid) {
        match (v, p) {
            (true, true) => split.0.push(i),
            (true, false) => split.1.push(i),
            _ => {}
        }
    }
    split
}

#[test]
fn balanced_sample_counts_slots_and_membership() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let labels = sampler_labels();
    let sample = ops::sample_balanced(&labels, 64, 0.25, 0, None);
    assert_eq!(sample.len(), 64);
    let (pos, neg) = drawn(&sample);
    assert_eq!((pos.len(), neg.len()), (16, 48));
    assert!(to_vec_i64(&labels.index_select(0, &Tensor::from_slice(&pos))).iter().all(|&l| l > 0));
    assert!(to_vec_i64(&labels.index_select(0, &Tensor::from_slice(&neg))).iter().all(|&l| l == 0));
    let mut unique: Vec<i64> = pos.iter().chain(&neg).copied().collect();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 64, "candidates are sampled without replacement");
    // Positives first, within the first floor(64 * 0.25) slots.
    assert_eq!(Vec::<bool>::try_from(&sample.positive).unwrap(), [vec![true; 16], vec![false; 48]].concat());
    // Few positives: all of them, negatives fill up to num_samples; the slots beyond the candidates (here the
    // ignored ones) are marked invalid instead of being cut.
    let sample = ops::sample_balanced(&labels, 256, 0.5, 0, None);
    assert_eq!(sample.len(), 150);
    let (pos, neg) = drawn(&sample);
    assert_eq!((pos.len(), neg.len()), (30, 100));
    assert_eq!(Vec::<bool>::try_from(&sample.valid).unwrap(), [vec![true; 130], vec![false; 20]].concat());
    // Reproducible under the torch seed, different across draws.
    tch::manual_seed(11);
    let first = drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, None));
    tch::manual_seed(11);
    assert_eq!(first, drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, None)));
    assert_ne!(first, drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, None)));
    // A per-image seed gives the same draw whatever the global RNG did before.
    let seeded = drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, Some(5)));
    let _ = Tensor::rand([3], (tch::Kind::Float, tch::Device::Cpu));
    assert_eq!(seeded, drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, Some(5))));
    assert_ne!(seeded, drawn(&ops::sample_balanced(&labels, 64, 0.25, 0, Some(6))));
}

/// The sampler draws what detectron2's `subsample_labels` draws: a uniformly random subset of
/// `min(P, num_samples * fraction)` positives and of `min(N, num_samples - positives)` negatives. Over 4000
/// draws every candidate's inclusion count is within 5 standard deviations of its binomial expectation, and the
/// sample's positives are independent of its negatives (their co-inclusion matches the product of marginals).
#[test]
fn balanced_sample_distribution_is_detectron2s() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(21);
    let draws = 4000;
    // (labels, num_samples, fraction, expected inclusion probability of a positive, of a negative)
    let scarce_negatives = Tensor::from_slice(&[[1i64; 100].as_slice(), &[0; 20], &[-1; 5]].concat());
    let cases = [(sampler_labels(), 64, 0.25, 16.0 / 30.0, 48.0 / 100.0), (scarce_negatives, 64, 0.25, 0.16, 1.0)];
    for (labels, num_samples, fraction, p_positive, p_negative) in cases {
        let values = to_vec_i64(&labels);
        let mut counts = vec![0u32; values.len()];
        let mut both = 0u32; // draws holding candidate 0 (positive) and the first negative
        let first_negative = values.iter().position(|&l| l == 0).unwrap() as i64;
        for _ in 0..draws {
            let (pos, neg) = drawn(&ops::sample_balanced(&labels, num_samples, fraction, 0, None));
            for &i in pos.iter().chain(&neg) {
                counts[i as usize] += 1;
            }
            both += u32::from(pos.contains(&0) && neg.contains(&first_negative));
        }
        for (i, (&label, &count)) in values.iter().zip(&counts).enumerate() {
            let p = match label {
                -1 => 0.0,
                0 => p_negative,
                _ => p_positive,
            };
            let expected = draws as f64 * p;
            let sd = (draws as f64 * p * (1.0 - p)).sqrt().max(1e-9);
            assert!(
                (count as f64 - expected).abs() <= 5.0 * sd,
                "candidate {i} (label {label}) drawn {count} times in {draws}, expected {expected:.0} +- {sd:.1}"
            );
        }
        let p = p_positive * p_negative;
        let sd = (draws as f64 * p * (1.0 - p)).sqrt().max(1e-9);
        assert!((both as f64 - draws as f64 * p).abs() <= 5.0 * sd, "co-inclusion {both} vs {:.0}", draws as f64 * p);
    }
}

#[test]
fn box_helpers() {
    let boxes = tensor2(&[[-5.0, 2.0, 30.0, 50.0], [10.0, 10.0, 10.5, 40.0], [3.0, 4.0, 8.0, 10.0]]);
    let clipped = ops::clip_boxes(&boxes, 40, 20);
    assert!(
        max_diff(&clipped, &tensor2(&[[0.0, 2.0, 20.0, 40.0], [10.0, 10.0, 10.5, 40.0], [3.0, 4.0, 8.0, 10.0]])) == 0.0
    );
    let keep = Vec::<bool>::try_from(ops::nonempty(&boxes, 1.0)).expect("mask");
    assert_eq!(keep, vec![true, false, true]);
    let xywh = ops::xyxy_to_xywh(&boxes);
    assert!(max_diff(&xywh.get(2), &Tensor::from_slice(&[3.0f32, 4.0, 5.0, 6.0])) == 0.0);
    assert!(max_diff(&ops::xywh_to_xyxy(&xywh), &boxes) == 0.0);
    // Intersection over the area of the first box: box 2 lies fully inside the crowd region.
    let crowd = tensor2(&[[0.0, 0.0, 10.0, 10.0]]);
    let ioa = Vec::<f32>::try_from(
        ops::box_ioa(&tensor2(&[[3.0, 4.0, 8.0, 10.0], [5.0, 5.0, 15.0, 15.0], [1.0, 1.0, 1.0, 1.0]]), &crowd)
            .flatten(0, -1),
    )
    .expect("ioa");
    assert_eq!(ioa, vec![1.0, 0.25, 0.0]);
}

/// NMS timing (not a correctness test): 2000 RPN-like candidates, 1000 runs, for the report. Run with
/// `cargo test -p detector --test ops_units -- --ignored --nocapture nms_timing`.
#[test]
#[ignore]
fn nms_timing() {
    tch::manual_seed(0);
    let count = 2000;
    let centres = Tensor::rand([count, 2], (Kind::Float, tch::Device::Cpu)) * Tensor::from_slice(&[1333.0f32, 800.0]);
    let sizes = (Tensor::rand([count, 2], (Kind::Float, tch::Device::Cpu)) * 4.0 + 2.5).exp();
    let realistic = Tensor::cat(&[&centres - &sizes / 2.0, &centres + &sizes / 2.0], 1);
    // Worst case for the greedy loop: disjoint boxes, nothing is suppressed, all n(n-1)/2 pairs are visited.
    let column = Tensor::arange(count, (Kind::Float, tch::Device::Cpu)).unsqueeze(1) * 3.0;
    let corner = &column + 1.0;
    let disjoint = Tensor::cat(&[&column, &column, &corner, &corner], 1);
    let scores = Tensor::rand([count], (Kind::Float, tch::Device::Cpu));
    for (name, boxes) in [("realistic", &realistic), ("disjoint", &disjoint)] {
        let kept = ops::nms(boxes, &scores, 0.7).size()[0];
        let start = std::time::Instant::now();
        let iterations = 1000;
        for _ in 0..iterations {
            let _ = ops::nms(boxes, &scores, 0.7);
        }
        let per_call = start.elapsed().as_secs_f64() / iterations as f64;
        println!("nms {name}: {count} boxes, {kept} kept, {:.3} ms per call", per_call * 1e3);
    }
}

/// RoI pooling timing (not a correctness test): detectron2's box-head pooler on an 800x1088 batch of two images,
/// 512 RoIs per image, 256 channels, forward and backward. Compare with
/// `tests/python/ops_timing.py`. Run with `cargo test -p detector --test ops_units -- --ignored --nocapture
/// pooler_timing`.
#[test]
#[ignore]
fn pooler_timing() {
    tch::manual_seed(0);
    let options = (Kind::Float, tch::Device::Cpu);
    let (height, width) = (800i64, 1088i64);
    let features: Vec<Tensor> = (2..6)
        .map(|level| Tensor::randn([2, 256, height >> level, width >> level], options).set_requires_grad(true))
        .collect();
    let boxes: Vec<Tensor> = (0..2)
        .map(|_| {
            let centres = Tensor::rand([512, 2], options) * Tensor::from_slice(&[width as f32, height as f32]);
            let sizes = (Tensor::rand([512, 2], options) * 4.0 + 2.5).exp();
            Tensor::cat(&[&centres - &sizes / 2.0, &centres + &sizes / 2.0], 1)
        })
        .collect();
    for (sampling_ratio, output) in [(0, 7), (2, 7), (2, 14), (0, 14)] {
        let pooler =
            ops::RoiPooler::new((output, output), vec![0.25, 0.125, 0.0625, 0.03125], sampling_ratio, true, 224.0, 4);
        let _ = pooler.forward(&features, &boxes);
        let iterations = 3;
        let (mut forward, mut backward) = (0.0, 0.0);
        for _ in 0..iterations {
            let start = std::time::Instant::now();
            let pooled = pooler.forward(&features, &boxes);
            forward += start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            pooled.sum(Kind::Float).backward();
            backward += start.elapsed().as_secs_f64();
        }
        println!(
            "pooler {output}x{output} sampling {sampling_ratio}: forward {:.1} ms, backward {:.1} ms ({} threads)",
            forward / iterations as f64 * 1e3,
            backward / iterations as f64 * 1e3,
            tch::get_num_threads()
        );
    }
}
