//! Bad datasets found by issue 15: truncated JPEGs in training and `data check --decode`, file names that leave
//! the image folder, absurd boxes, an all-empty training set, every problem reported in one `check`, and the
//! bound on loader threads. Each test builds its dataset in a temporary folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use data::config::{DataConfig, InputConfig, MissingImagePolicy, MAX_NUM_WORKERS};
use data::{check, CocoDataset, LoadOptions, Loader, LoaderOptions, TrainSampler};

/// Three 64x64 JPEGs `1.jpg`..`3.jpg` with one box each, written under `dir/img`, and `dir/ann.json` listing
/// them with `extra_images` and `annotations` appended to the generated entries (JSON fragments, may be empty).
fn dataset(dir: &Path, extra_images: &str, annotations: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut images = Vec::new();
    let mut anns = Vec::new();
    for id in 1..=3u32 {
        // Textured, so that most of each file is entropy-coded data rather than headers.
        let picture = image::RgbImage::from_fn(64, 64, |x, y| {
            let v = (x * 7 + y * 13 + id) ^ (x * y);
            image::Rgb([(v % 251) as u8, ((v / 3) % 241) as u8, ((x * 31 + y * 17) % 239) as u8])
        });
        picture.save(dir.join(format!("img/{id}.jpg"))).unwrap();
        images.push(format!(r#"{{"id": {id}, "file_name": "{id}.jpg", "width": 64, "height": 64}}"#));
        anns.push(format!(
            r#"{{"id": {}, "image_id": {id}, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0,
                 "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]}}"#,
            id * 10
        ));
    }
    images.extend(extra_images.split_terminator(';').map(str::to_owned));
    anns.extend(annotations.split_terminator(';').map(str::to_owned));
    let json = format!(
        r#"{{"images": [{}], "annotations": [{}], "categories": [{{"id": 1, "name": "box"}}]}}"#,
        images.join(", "),
        anns.join(", ")
    );
    let path = dir.join("ann.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// A `[data]` section whose train and val splits are both this dataset.
fn config(annotations: &Path, images: &Path) -> DataConfig {
    let split = format!("{{ annotations = {:?}, images = {:?} }}", annotations.display(), images.display());
    toml::from_str(&format!("train = {split}\nval = {split}\n")).unwrap()
}

/// Keeps the first third of a file, as an interrupted copy would.
fn truncate(file: &Path) {
    let bytes = std::fs::read(file).unwrap();
    std::fs::write(file, &bytes[..bytes.len() / 3]).unwrap();
}

fn input() -> InputConfig {
    InputConfig { min_size_train: vec![64], max_size_train: 64, ..InputConfig::default() }
}

#[test]
fn a_truncated_jpeg_stops_training_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let json = dataset(dir.path(), "", "");
    let dataset = Arc::new(CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap());
    truncate(&dir.path().join("img/2.jpg"));
    let sampler = TrainSampler::new(&dataset, 3, 0, 1, false, 0).unwrap();
    let options = LoaderOptions { num_workers: 1, prefetch: 1, missing_images: MissingImagePolicy::Error };
    let mut loader = Loader::train(dataset.clone(), input(), sampler.clone(), options).unwrap();
    let err = loader.next().unwrap().unwrap_err().to_string();
    assert!(err.contains("2.jpg") && err.contains("image id 2") && err.contains("truncated JPEG"), "{err}");
    let skip = LoaderOptions { missing_images: MissingImagePolicy::Skip, ..options };
    let mut loader = Loader::train(dataset, input(), sampler, skip).unwrap();
    // One batch per epoch; the damaged image is met in every epoch but counted (and warned about) once.
    for _ in 0..3 {
        assert_eq!(loader.next().unwrap().unwrap().image_ids.len(), 2);
    }
    assert_eq!(loader.skipped(), 1);
}

#[test]
fn check_reports_annotation_and_image_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    let odd = r#"{"id": 91, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1, 5]]}"#;
    let huge = r#"{"id": 92, "image_id": 2, "category_id": 1, "bbox": [1e30, 1, 5, 5]}"#;
    let missing = r#"{"id": 4, "file_name": "4.jpg", "width": 64, "height": 64}"#;
    let json = dataset(dir.path(), missing, &format!("{odd};{huge}"));
    truncate(&dir.path().join("img/3.jpg"));
    let config = config(&json, &dir.path().join("img"));
    // Loading for training stops at the first problem, in file order.
    let err = CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("annotation id 91") && err.contains("odd number"), "{err}");

    let report = check(&config, true, false);
    let train = &report.splits[0];
    let problems = train.problems.join("\n");
    assert_eq!(train.problems.len(), 4, "{problems}");
    assert!(problems.contains("annotation id 91") && problems.contains("odd number of coordinates"), "{problems}");
    assert!(
        problems.contains("annotation id 92") && problems.contains("far outside the 64x64 image id 2"),
        "{problems}"
    );
    assert!(problems.contains("4.jpg: image id 4: image file is missing"), "{problems}");
    assert!(problems.contains("3.jpg: image id 3: truncated JPEG"), "{problems}");
    // Without --decode only headers are read: the truncated file's header is intact.
    assert_eq!(check(&config, false, false).splits[0].problems.len(), 3);
}

#[test]
fn non_finite_and_absurd_boxes_are_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (bbox, expected) in [
        ("[1e30, 0, 5, 5]", "far outside"),
        ("[0, 0, 1e30, 5]", "far outside"),
        ("[0, -1e30, 5, 5]", "far outside"),
        ("[0, 0, 5, 1e999]", "number out of range at line"),
    ] {
        let ann = format!(r#"{{"id": 77, "image_id": 3, "category_id": 1, "bbox": {bbox}}}"#);
        let json = dataset(dir.path(), "", &ann);
        let err = CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("ann.json") && err.contains(expected), "{err}");
        assert!(err.contains("annotation id 77") || expected.contains("line"), "{err}");
    }
    // Boxes a little outside the image (rounding) are still fine.
    let ann = r#"{"id": 77, "image_id": 3, "category_id": 1, "bbox": [-0.5, 60, 64.7, 4.9]}"#;
    let json = dataset(dir.path(), "", ann);
    CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap();
}

#[test]
fn file_names_outside_the_image_folder_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.jpg");
    std::fs::create_dir_all(dir.path().join("img")).unwrap();
    image::RgbImage::new(64, 64).save(&outside).unwrap();
    for (file_name, why) in
        [("../outside.jpg", "climbs out with `..`"), (outside.to_str().unwrap(), "is an absolute path")]
    {
        let entry = format!(r#"{{"id": 9, "file_name": "{file_name}", "width": 64, "height": 64}}"#);
        let json = dataset(dir.path(), &entry, "");
        let err = CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("ann.json: image id 9") && err.contains(why), "{err}");
        assert!(err.contains("data.allow_outside_image_root"), "{err}");
        let allowed = LoadOptions { allow_outside_image_root: true, ..LoadOptions::default() };
        let loaded = CocoDataset::load(&json, &dir.path().join("img"), allowed).unwrap();
        assert_eq!(loaded.images.len(), 4);
    }
    let text = "train = { annotations = \"a\", images = \"b\" }\nval = { annotations = \"a\", images = \"b\" }\n\
                allow_outside_image_root = true\n";
    let parsed: DataConfig = toml::from_str(text).unwrap();
    assert!(LoadOptions::from_config(&parsed, false).allow_outside_image_root);
}

#[test]
fn an_all_empty_training_set_says_the_images_were_filtered_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let json = dataset(dir.path(), "", "");
    let text = std::fs::read_to_string(&json).unwrap().replace("\"iscrowd\": 0", "\"iscrowd\": 1");
    std::fs::write(&json, text).unwrap();
    let mut dataset = CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap();
    dataset.filter_for_training();
    let err = TrainSampler::new(&dataset, 2, 0, 1, true, 0).unwrap_err().to_string();
    assert!(err.contains("0 images") && err.contains("3 images were filtered out as empty"), "{err}");
    assert!(err.contains("data.filter_empty"), "{err}");
}

#[test]
fn thousands_of_loader_workers_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let json = dataset(dir.path(), "", "");
    let dataset = Arc::new(CocoDataset::load(&json, &dir.path().join("img"), LoadOptions::default()).unwrap());
    let sampler = TrainSampler::new(&dataset, 1, 0, 1, false, 0).unwrap();
    let options = LoaderOptions { num_workers: 20000, prefetch: 2, missing_images: MissingImagePolicy::Error };
    let err = Loader::train(dataset.clone(), input(), sampler.clone(), options).err().unwrap().to_string();
    assert!(err.contains("data.num_workers = 20000") && err.contains(&MAX_NUM_WORKERS.to_string()), "{err}");
    let options = LoaderOptions { num_workers: MAX_NUM_WORKERS, ..options };
    assert!(Loader::train(dataset, input(), sampler, options).unwrap().next().unwrap().is_ok());
}
