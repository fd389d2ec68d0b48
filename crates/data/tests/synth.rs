//! The synthetic dataset: deterministic, valid COCO, visible polygons that cover exactly one shape's pixels.

use data::coco::{CocoDataset, LoadOptions, Segmentation};
use data::synth::{generate, SynthOptions};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["annotations", "train", "val"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        out.extend(names.into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())));
    }
    out.into_iter().map(|(p, b)| (p.rsplit('/').take(2).collect::<Vec<_>>().join("/"), b)).collect()
}

#[test]
fn same_seed_gives_identical_files_and_another_seed_does_not() {
    let options = SynthOptions { train: 6, val: 2, size: 96, seed: 4 };
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(a.path(), &options).unwrap();
    generate(b.path(), &options).unwrap();
    generate(c.path(), &SynthOptions { seed: 5, ..options }).unwrap();
    assert_eq!(files(a.path()), files(b.path()));
    assert_ne!(files(a.path()), files(c.path()));
}

#[test]
fn dataset_is_valid_occluded_and_polygons_cover_one_colour() {
    let dir = tempfile::tempdir().unwrap();
    let size = 128;
    let summary = generate(dir.path(), &SynthOptions { train: 40, val: 4, size, seed: 0 }).unwrap();
    let dataset = CocoDataset::load_split(&summary.train, "train", LoadOptions::default()).unwrap();
    assert_eq!(dataset.images.len(), 40);
    assert_eq!(dataset.categories.names(), ["circle", "triangle", "square", "star"]);
    let (per_class, crowd) = dataset.instance_counts();
    assert!(per_class.iter().all(|n| *n > 10), "{per_class:?}");
    assert_eq!(crowd, 0);
    let mut multi_part = 0;
    for record in &dataset.images {
        assert!((1..=8).contains(&record.annotations.len()));
        let pixels = image::open(&record.file).unwrap().into_rgb8();
        for ann in &record.annotations {
            let Some(Segmentation::Polygons(parts)) = &ann.segmentation else { panic!("polygons expected") };
            multi_part += usize::from(parts.len() > 1);
            let [_, _, w, h] = ann.bbox;
            assert!(w.max(h) >= 10.0 && w.max(h) <= size as f64 / 2.0 + 1.0, "size {w}x{h}");
            let rle = hotcoco::mask::fr_polys(parts, size, size).unwrap();
            let mask = hotcoco::mask::decode(&rle);
            let inside: Vec<[u8; 3]> = (0..mask.len())
                .filter(|&i| mask[i] != 0)
                .map(|i| pixels.get_pixel((i / size as usize) as u32, (i % size as usize) as u32).0)
                .collect();
            // The instance was painted in one colour plus noise of +-6: nearly every covered pixel is close to the
            // median (boundary pixels of the rasterisation may belong to a neighbour).
            let median: [i32; 3] = std::array::from_fn(|c| {
                let mut v: Vec<i32> = inside.iter().map(|p| p[c] as i32).collect();
                v.sort();
                v[v.len() / 2]
            });
            let close = inside.iter().filter(|p| (0..3).all(|c| (p[c] as i32 - median[c]).abs() <= 14)).count();
            assert!(close as f64 >= 0.9 * inside.len() as f64, "annotation {}: {close}/{}", ann.id, inside.len());
        }
    }
    assert!(multi_part > 0, "some occlusion splits a shape into several visible parts");
}
