//! Samplers and the parallel loader: worker-count independence, exact resume, sharding, failure policy.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use data::config::{InputConfig, LsjConfig, MissingImagePolicy};
use data::sampler::{inference_shard, SamplerState, TrainSampler};
use data::{Batch, CocoDataset, Loader, LoaderOptions, TargetMasks};

fn small_input() -> InputConfig {
    InputConfig {
        min_size_train: vec![96, 112, 128],
        max_size_train: 200,
        min_size_test: 128,
        max_size_test: 200,
        ..InputConfig::default()
    }
}

fn options(num_workers: usize) -> LoaderOptions {
    LoaderOptions { num_workers, prefetch: 3, missing_images: MissingImagePolicy::Error }
}

fn assert_same(a: &Batch, b: &Batch) {
    assert_eq!(a.image_ids, b.image_ids);
    assert_eq!(a.image_sizes, b.image_sizes);
    assert_eq!(a.flipped, b.flipped);
    assert!(a.images.equal(&b.images), "image tensors differ for {:?}", a.image_ids);
    for (ta, tb) in a.targets.iter().zip(&b.targets) {
        assert!(ta.boxes.equal(&tb.boxes) && ta.labels.equal(&tb.labels));
        assert_eq!(ta.annotation_ids, tb.annotation_ids);
        match (&ta.masks, &tb.masks) {
            (TargetMasks::Polygons(pa), TargetMasks::Polygons(pb)) => assert_eq!(pa, pb),
            (TargetMasks::Bitmaps(ba), TargetMasks::Bitmaps(bb)) => assert!(ba.equal(bb)),
            _ => panic!("mask kinds differ"),
        }
    }
}

fn train_loader(dataset: &Arc<CocoDataset>, input: &InputConfig, workers: usize, seed: u64) -> Loader {
    let sampler = TrainSampler::new(dataset, 2, 0, 1, true, seed).unwrap();
    Loader::train(dataset.clone(), input.clone(), sampler, options(workers)).unwrap()
}

#[test]
fn batches_are_identical_with_one_and_four_workers() {
    let mut dataset = common::load_mini("train");
    dataset.filter_for_training();
    let dataset = Arc::new(dataset);
    let input = small_input();
    let one: Vec<Batch> = train_loader(&dataset, &input, 1, 5).take(6).map(Result::unwrap).collect();
    let four: Vec<Batch> = train_loader(&dataset, &input, 4, 5).take(6).map(Result::unwrap).collect();
    let inline: Vec<Batch> = train_loader(&dataset, &input, 0, 5).take(6).map(Result::unwrap).collect();
    for ((a, b), c) in one.iter().zip(&four).zip(&inline) {
        assert_same(a, b);
        assert_same(a, c);
        assert_eq!(a.images.size()[0], 2);
        assert_eq!(a.images.size()[2] % 32, 0);
        assert_eq!(a.images.size()[3] % 32, 0);
        // Aspect-ratio grouping: both images of a batch are landscape or both are not.
        let landscape: Vec<bool> = a.image_sizes.iter().map(|(h, w)| w > h).collect();
        assert!(landscape.iter().all(|l| *l == landscape[0]) || a.image_ids.is_empty());
    }
    let other_seed: Vec<Batch> = train_loader(&dataset, &input, 2, 6).take(6).map(Result::unwrap).collect();
    assert_ne!(
        one.iter().map(|b| b.image_ids.clone()).collect::<Vec<_>>(),
        other_seed.iter().map(|b| b.image_ids.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn resuming_from_a_saved_state_continues_the_same_sequence() {
    let dataset = common::load_mini("train");
    // Rank 1 of 2 at batch 1: the 7 images are cut to 6 per epoch, 3 per rank, so an epoch is 3 batches and the
    // stops below fall inside, at the end of, and past the first epoch.
    let mut uninterrupted = TrainSampler::new(&dataset, 1, 1, 2, true, 11).unwrap();
    let per_epoch = uninterrupted.batches_of_epoch(0).len();
    assert_eq!(per_epoch, 3);
    let all: Vec<_> = (0..3 * per_epoch).map(|_| uninterrupted.next_batch()).collect();
    for stop in [1, per_epoch - 1, per_epoch, per_epoch + 2] {
        let mut first = TrainSampler::new(&dataset, 1, 1, 2, true, 11).unwrap();
        (0..stop).for_each(|_| {
            first.next_batch();
        });
        let saved: SamplerState = serde_json::from_str(&serde_json::to_string(&first.state()).unwrap()).unwrap();
        let mut resumed = TrainSampler::new(&dataset, 1, 1, 2, true, 11).unwrap();
        resumed.restore(saved);
        let rest: Vec<_> = (stop..3 * per_epoch).map(|_| resumed.next_batch()).collect();
        assert_eq!(rest, all[stop..], "resume after {stop} batches");
    }

    // Through the loader: the state reported after batch k resumes at batch k + 1.
    let dataset = Arc::new(dataset);
    let input = small_input();
    let mut loader = train_loader(&dataset, &input, 2, 3);
    let reference: Vec<Batch> = (&mut loader).take(5).map(Result::unwrap).collect();
    let mut partial = train_loader(&dataset, &input, 2, 3);
    (&mut partial).take(2).for_each(|b| drop(b.unwrap()));
    let state = partial.sampler_state().unwrap();
    assert_eq!(state.position, 2);
    drop(partial);
    let mut sampler = TrainSampler::new(&dataset, 2, 0, 1, true, 3).unwrap();
    sampler.restore(state);
    let resumed: Vec<Batch> =
        Loader::train(dataset.clone(), input, sampler, options(3)).unwrap().take(3).map(Result::unwrap).collect();
    for (a, b) in reference[2..].iter().zip(&resumed) {
        assert_same(a, b);
    }
}

#[test]
fn ranks_see_disjoint_shards_and_inference_covers_every_image_once() {
    let dataset = common::load_mini("val");
    let world = 3;
    let mut seen = HashSet::new();
    for rank in 0..world {
        let sampler = TrainSampler::new(&dataset, 2, rank, world, true, 1).unwrap();
        for index in sampler.batches_of_epoch(4).into_iter().flatten() {
            assert!(seen.insert(index), "index {index} drawn by two ranks in one epoch");
        }
    }
    // The 7 val images are cut to 6 (a multiple of the world size), 2 per rank, and a rank's 2 images always make
    // one batch (same orientation, or the leftovers of both groups batched together): 6 images are drawn.
    assert_eq!(seen.len(), 6);
    // Every rank draws the same number of batches in every epoch (else ranks drift apart across epochs), even
    // when the image count is not a multiple of the world size.
    for epoch in 0..5 {
        let counts: Vec<usize> = (0..world)
            .map(|rank| TrainSampler::new(&dataset, 2, rank, world, true, 1).unwrap().batches_of_epoch(epoch).len())
            .collect();
        assert!(counts.iter().all(|&c| c == counts[0]), "epoch {epoch}: batches per rank {counts:?}");
    }
    // Without grouping, 2 ranks x batch 1 draw exactly the images (and per-sample seeds) of 1 rank x batch 2.
    let mut whole = TrainSampler::new(&dataset, 2, 0, 1, false, 9).unwrap();
    let mut halves: Vec<TrainSampler> =
        (0..2).map(|rank| TrainSampler::new(&dataset, 1, rank, 2, false, 9).unwrap()).collect();
    for _ in 0..3 * dataset.images.len() {
        let batch = whole.next_batch();
        let split: Vec<_> = halves.iter_mut().map(|s| s.next_batch()).collect();
        assert_eq!(batch.indices, [split[0].indices[0], split[1].indices[0]]);
        assert_eq!(batch.seeds, [split[0].seeds[0], split[1].seeds[0]]);
    }
    let ranges: Vec<_> = (0..world).map(|r| inference_shard(81, r, world)).collect();
    assert_eq!(ranges, vec![0..27, 27..54, 54..81]);
    let ranges: Vec<_> = (0..4).map(|r| inference_shard(10, r, 4)).collect();
    assert_eq!(ranges, vec![0..3, 3..6, 6..8, 8..10]);

    let dataset = Arc::new(dataset);
    let mut ids = Vec::new();
    for rank in 0..world {
        let loader = Loader::inference(dataset.clone(), small_input(), 2, rank, world, options(2)).unwrap();
        for batch in loader {
            let batch = batch.unwrap();
            assert!(batch.flipped.iter().all(|f| !f));
            ids.extend(batch.image_ids);
        }
    }
    let expected: Vec<u64> = dataset.images.iter().map(|r| r.image_id).collect();
    assert_eq!(ids, expected);
}

#[test]
fn large_scale_jitter_gives_fixed_size_crops_with_boxes_inside() {
    let mut dataset = common::load_mini("train");
    dataset.filter_for_training();
    let dataset = Arc::new(dataset);
    let input =
        InputConfig { lsj: LsjConfig { enabled: true, min_scale: 0.5, max_scale: 2.0, size: 160 }, ..small_input() };
    let mut instances = 0;
    for batch in train_loader(&dataset, &input, 2, 9).take(8) {
        let batch = batch.unwrap();
        for ((h, w), t) in batch.image_sizes.iter().zip(&batch.targets) {
            assert!(*h <= 160 && *w <= 160);
            let boxes = Vec::<f32>::try_from(t.boxes.flatten(0, -1)).unwrap();
            for b in boxes.chunks(4) {
                assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= *w as f32 && b[3] <= *h as f32 && b[2] > b[0]);
            }
            instances += t.annotation_ids.len();
        }
    }
    assert!(instances > 0);
}

#[test]
fn a_failing_image_errors_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let summary =
        data::generate_synthetic(dir.path(), &data::SynthOptions { train: 4, val: 1, size: 64, seed: 2 }).unwrap();
    let dataset = CocoDataset::load_split(&summary.train, "train", data::LoadOptions::default()).unwrap();
    std::fs::write(&dataset.images[1].file, b"garbage").unwrap();
    let dataset = Arc::new(dataset);
    let input = InputConfig { min_size_train: vec![64], max_size_train: 64, ..InputConfig::default() };
    let sampler = TrainSampler::new(&dataset, 4, 0, 1, false, 0).unwrap();
    let mut loader = Loader::train(dataset.clone(), input.clone(), sampler.clone(), options(2)).unwrap();
    let err = loader.next().unwrap().unwrap_err().to_string();
    assert!(err.contains("000002.png") && err.contains("image id 2"), "{err}");
    let skip = LoaderOptions { missing_images: MissingImagePolicy::Skip, ..options(2) };
    let mut loader = Loader::train(dataset, input, sampler, skip).unwrap();
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.image_ids.len(), 3);
    assert_eq!(loader.skipped(), 1);
}

#[test]
fn training_batches_take_a_pad_bucket_and_evaluation_batches_do_not() {
    let mut dataset = common::load_mini("train");
    dataset.filter_for_training();
    let dataset = Arc::new(dataset);
    // Shorter side up to 128, longer up to 200 -> 224 after rounding to 32: one bucket each way holds every batch.
    let input = InputConfig { train_pad_buckets: vec![[128, 224], [224, 128], [224, 224]], ..small_input() };
    input.validate().unwrap();
    let batches: Vec<Batch> = train_loader(&dataset, &input, 2, 5).take(6).map(Result::unwrap).collect();
    for batch in &batches {
        let size = [batch.images.size()[2], batch.images.size()[3]];
        assert!([[128, 224], [224, 128]].contains(&size), "a training batch padded to {size:?}");
    }
    // Same samples without buckets: the same pixels, less padding.
    let plain: Vec<Batch> = train_loader(&dataset, &small_input(), 2, 5).take(6).map(Result::unwrap).collect();
    for (bucketed, plain) in batches.iter().zip(&plain) {
        let [h, w] = [plain.images.size()[2], plain.images.size()[3]];
        assert!(bucketed.images.narrow(2, 0, h).narrow(3, 0, w).equal(&plain.images));
        assert_eq!(
            bucketed.images.abs().sum(tch::Kind::Double).double_value(&[]),
            plain.images.abs().sum(tch::Kind::Double).double_value(&[])
        );
    }
    // Evaluation batches keep their own padded size (detectron2's), buckets or not.
    let own_size = |batch: &Batch| {
        let round_up = |v: i64| (v + 31) / 32 * 32;
        let h = batch.image_sizes.iter().map(|s| s.0).max().unwrap();
        let w = batch.image_sizes.iter().map(|s| s.1).max().unwrap();
        [round_up(h), round_up(w)]
    };
    let evaluation = Loader::inference(dataset.clone(), input.clone(), 2, 0, 1, options(2)).unwrap();
    let mut count = 0;
    for batch in evaluation {
        let batch = batch.unwrap();
        assert_eq!([batch.images.size()[2], batch.images.size()[3]], own_size(&batch));
        count += 1;
    }
    assert!(count > 0);
    assert!(plain.iter().all(|b| [b.images.size()[2], b.images.size()[3]] == own_size(b)));
}
