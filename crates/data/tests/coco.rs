//! Dataset loading on the coco-mini fixture, configuration parsing, and the clear error of every bad input.

mod common;

use std::path::PathBuf;

use data::check::{check, verify_image_file};
use data::coco::{CocoDataset, LoadOptions, Segmentation};
use data::config::{DataConfig, InputConfig, MissingImagePolicy, OneOrMany, SplitConfig};
use data::DataError;

/// The counts below are those of `tests/data/coco-mini/annotations/*.json` (see its PROVENANCE.md): train has 7
/// images, 84 annotations, 1 crowd region (image 204805) and a 7-part polygon (image 180239); val has 7 images
/// and 4 crowd regions. Both files list all 80 COCO categories.
#[test]
fn coco_mini_loads_with_crowd_rle_multipart_polygons_and_a_grayscale_jpeg() {
    let train = common::load_mini("train");
    assert_eq!(train.images.len(), 7);
    let annotations: Vec<_> = train.images.iter().flat_map(|r| &r.annotations).collect();
    assert_eq!(annotations.len() + train.stats.dropped_empty_boxes, 84);
    let crowd: Vec<_> = annotations.iter().filter(|a| a.iscrowd).collect();
    assert_eq!(crowd.len(), 1);
    assert!(crowd.iter().all(|a| matches!(a.segmentation, Some(Segmentation::Rle(_)))));
    let max_parts = annotations
        .iter()
        .filter_map(|a| match &a.segmentation {
            Some(Segmentation::Polygons(p)) => Some(p.len()),
            _ => None,
        })
        .max()
        .unwrap();
    assert_eq!(max_parts, 7, "image 180239 has a 7-part polygon");
    assert_eq!(train.categories.len(), 80);
    assert_eq!(train.categories.label(1), Some(0));
    assert_eq!(train.categories.label(90), Some(79));
    assert_eq!(train.categories.category_id(79), Some(90));
    assert_eq!(train.categories.name(0), Some("person"));
    assert_eq!(train.categories.label(12), None, "12 is one of COCO's unused ids");
    // The crowd RLE decodes to the area the JSON states (pycocotools semantics through hotcoco).
    let rle = match &crowd[0].segmentation {
        Some(Segmentation::Rle(r)) => r,
        _ => unreachable!(),
    };
    assert!(hotcoco::mask::area(rle) > 0);
    // Image 204805 is a single-channel JPEG: it decodes to RGB with three equal channels at the JSON's size.
    let gray = train.images.iter().find(|r| r.image_id == 204805).unwrap();
    verify_image_file(gray, true).unwrap();
    let decoded = data::transform::decode_rgb(&gray.file).unwrap();
    assert_eq!((decoded.width, decoded.height), (500, 346));
    assert!(decoded.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    let val = common::load_mini("val");
    assert_eq!(val.images.len(), 7);
    let (_, val_crowd) = val.instance_counts();
    assert_eq!(val_crowd, 4);
}

#[test]
fn config_sections_parse_with_defaults_lists_and_unknown_key_errors() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        data: DataConfig,
        #[serde(default)]
        input: InputConfig,
    }
    let text = r#"
        [data]
        train.annotations = ["a.json", "b.json"]
        train.images = ["a", "b"]
        val = { annotations = "v.json", images = "v" }
        missing_images = "skip"
        [input]
        min_size_train = [128, 160]
        format = "BGR"
        lsj = { enabled = true, size = 512 }
    "#;
    let file: File = toml::from_str(text).unwrap();
    assert_eq!(file.data.train.sources("train").unwrap().len(), 2);
    assert_eq!(file.data.val.annotations, OneOrMany::One("v.json".into()));
    assert_eq!(file.data.missing_images, MissingImagePolicy::Skip);
    assert!(file.data.filter_empty && file.data.aspect_ratio_grouping);
    assert_eq!(file.input.format, data::PixelFormat::Bgr);
    assert_eq!(file.input.lsj.size, 512);
    assert_eq!(file.input.lsj.min_scale, 0.1);
    assert_eq!(file.input.max_size_train, 1333);
    assert_eq!(InputConfig::default().min_size_train, vec![640, 672, 704, 736, 768, 800]);

    let typo = text.replace("missing_images", "missing_image");
    let err = toml::from_str::<File>(&typo).err().unwrap().to_string();
    assert!(err.contains("missing_image"), "{err}");
    let unequal = text.replace(r#"train.images = ["a", "b"]"#, r#"train.images = ["a"]"#);
    let file: File = toml::from_str(&unequal).unwrap();
    let err = file.data.train.sources("train").unwrap_err().to_string();
    assert!(err.contains("data.train.annotations has 2") && err.contains("data.train.images has 1"), "{err}");
}

/// A temp folder with a valid two-image dataset that each test then breaks in one way.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        for (name, w, h) in [("a.png", 40u32, 30u32), ("b.png", 20, 50)] {
            image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]))
                .save(dir.path().join("img").join(name))
                .unwrap();
        }
        Fixture { dir }
    }
    fn json(&self, annotations: &str) -> PathBuf {
        let text = format!(
            r#"{{"images": [{{"id": 1, "file_name": "a.png", "width": 40, "height": 30}},
                          {{"id": 2, "file_name": "b.png", "width": 20, "height": 50}}],
               "categories": [{{"id": 3, "name": "x"}}, {{"id": 7, "name": "y"}}],
               "annotations": [{annotations}]}}"#
        );
        let path = self.dir.path().join("ann.json");
        std::fs::write(&path, text).unwrap();
        path
    }
    fn load(&self, annotations: &str, policy: MissingImagePolicy) -> Result<CocoDataset, DataError> {
        let path = self.json(annotations);
        CocoDataset::load(
            &path,
            &self.dir.path().join("img"),
            LoadOptions { missing_images: policy, ..LoadOptions::default() },
        )
    }
}

const GOOD: &str = r#"{"id": 11, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8],
    "segmentation": [[1, 2, 11, 2, 11, 10, 1, 10]], "iscrowd": 0}"#;

fn error_of(annotations: &str) -> String {
    Fixture::new().load(annotations, MissingImagePolicy::Error).unwrap_err().to_string()
}

#[test]
fn valid_fixture_loads() {
    let fixture = Fixture::new();
    let dataset = fixture.load(GOOD, MissingImagePolicy::Error).unwrap();
    assert_eq!(dataset.images.len(), 2);
    assert_eq!(dataset.images[0].annotations[0].label, 0);
}

#[test]
fn malformed_json_reports_file_line_and_column() {
    let err = error_of(&format!("{GOOD},\n {{\"id\": 12,, }}"));
    assert!(err.contains("ann.json:6:") && err.contains("column"), "{err}");
    let err = error_of(r#"{"id": 12, "image_id": 1, "category_id": 3, "bbox": "wide"}"#);
    assert!(err.contains("ann.json:4:") && err.contains("invalid COCO JSON"), "{err}");
}

#[test]
fn unknown_ids_name_the_annotation() {
    let err = error_of(&GOOD.replace(r#""image_id": 1"#, r#""image_id": 99"#));
    assert!(
        err.contains("ann.json") && err.contains("annotation id 11") && err.contains("unknown image id 99"),
        "{err}"
    );
    let err = error_of(&GOOD.replace(r#""category_id": 3"#, r#""category_id": 4"#));
    assert!(err.contains("annotation id 11") && err.contains("unknown category id 4"), "{err}");
    let err = error_of(&format!("{GOOD}, {GOOD}"));
    assert!(err.contains("annotation id 11") && err.contains("duplicate"), "{err}");
}

#[test]
fn bad_polygons_and_rle_name_the_annotation() {
    let err = error_of(&GOOD.replace("[[1, 2, 11, 2, 11, 10, 1, 10]]", "[[1, 2, 11, 2, 11, 10, 1, 10], [1, 2, 3, 4]]"));
    assert!(err.contains("annotation id 11") && err.contains("part 1 has 2 points"), "{err}");
    let err = error_of(&GOOD.replace("[[1, 2, 11, 2, 11, 10, 1, 10]]", "[[1, 2, 11, 2, 11, 10, 1]]"));
    assert!(err.contains("annotation id 11") && err.contains("odd number of coordinates (7)"), "{err}");
    let err = error_of(&GOOD.replace("[[1, 2, 11, 2, 11, 10, 1, 10]]", r#"{"size": [30, 41], "counts": [1230]}"#));
    assert!(err.contains("annotation id 11") && err.contains("RLE size [30, 41]"), "{err}");
    let err = error_of(&GOOD.replace("[[1, 2, 11, 2, 11, 10, 1, 10]]", r#"{"size": [30, 40], "counts": [5, 7]}"#));
    assert!(err.contains("annotation id 11") && err.contains("RLE"), "{err}");
}

#[test]
fn empty_boxes_are_dropped_and_counted() {
    let zero = GOOD.replace("[1, 2, 10, 8]", "[1, 2, 0, 8]").replace("\"id\": 11", "\"id\": 12");
    let dataset = Fixture::new().load(&format!("{GOOD}, {zero}"), MissingImagePolicy::Error).unwrap();
    assert_eq!(dataset.stats.dropped_empty_boxes, 1);
    assert_eq!(dataset.images[0].annotations.len(), 1);
}

#[test]
fn missing_images_error_or_skip_with_count() {
    let fixture = Fixture::new();
    std::fs::remove_file(fixture.dir.path().join("img/b.png")).unwrap();
    let err = fixture.load(GOOD, MissingImagePolicy::Error).unwrap_err().to_string();
    assert!(err.contains("b.png") && err.contains("image id 2") && err.contains("missing"), "{err}");
    let dataset = fixture.load(GOOD, MissingImagePolicy::Skip).unwrap();
    assert_eq!(dataset.images.len(), 1);
    assert_eq!(dataset.stats.skipped_missing_images.len(), 1);
}

#[test]
fn undecodable_and_wrong_size_images_are_reported() {
    let fixture = Fixture::new();
    let dataset = fixture.load(GOOD, MissingImagePolicy::Error).unwrap();
    std::fs::write(fixture.dir.path().join("img/a.png"), b"not an image").unwrap();
    let err = verify_image_file(&dataset.images[0], true).unwrap_err().to_string();
    assert!(err.contains("a.png") && err.contains("image id 1") && err.contains("decode"), "{err}");
    image::RgbImage::new(21, 50).save(fixture.dir.path().join("img/b.png")).unwrap();
    let err = verify_image_file(&dataset.images[1], false).unwrap_err().to_string();
    assert!(err.contains("b.png") && err.contains("21x50") && err.contains("20x50"), "{err}");

    // `check` collects every problem instead of stopping at the first.
    let json = fixture.json(GOOD);
    let split = SplitConfig {
        annotations: OneOrMany::One(json.clone()),
        images: OneOrMany::One(fixture.dir.path().join("img")),
    };
    let config = DataConfig {
        train: split.clone(),
        val: split,
        missing_images: MissingImagePolicy::Error,
        allow_outside_image_root: false,
        filter_empty: true,
        num_workers: 1,
        prefetch: 1,
        aspect_ratio_grouping: true,
        synth: None,
    };
    let report = check(&config, true, false);
    assert_eq!(report.problem_count(), 4, "{report}");
    let text = report.to_string();
    assert!(text.contains("[train] images: 2  instances: 1  crowd: 0"), "{text}");
}

#[test]
fn concatenation_requires_equal_categories() {
    let fixture = Fixture::new();
    let json = fixture.json(GOOD);
    let img = fixture.dir.path().join("img");
    let split = SplitConfig {
        annotations: OneOrMany::Many(vec![json.clone(), json.clone()]),
        images: OneOrMany::Many(vec![img.clone(), img.clone()]),
    };
    let both = CocoDataset::load_split(&split, "train", LoadOptions::default()).unwrap();
    assert_eq!(both.images.len(), 4);
    assert_eq!(both.images[3].source, 1);
    let other = fixture.dir.path().join("other.json");
    std::fs::write(&other, std::fs::read_to_string(&json).unwrap().replace(r#""name": "y""#, r#""name": "z""#))
        .unwrap();
    let split = SplitConfig {
        annotations: OneOrMany::Many(vec![json, other]),
        images: OneOrMany::Many(vec![img.clone(), img]),
    };
    let err = CocoDataset::load_split(&split, "train", LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("other.json") && err.contains("categories differ"), "{err}");
}

#[test]
fn filtering_for_training_drops_images_without_instances() {
    let fixture = Fixture::new();
    let json = fixture.json(GOOD);
    let split =
        SplitConfig { annotations: OneOrMany::One(json), images: OneOrMany::One(fixture.dir.path().join("img")) };
    let config = DataConfig { train: split.clone(), val: split, ..DataConfig::default() };
    let options = LoadOptions::from_config(&config, false);
    let mut train = CocoDataset::load_split(&config.train, "train", options).unwrap();
    assert_eq!(train.images.len(), 2);
    train.filter_for_training();
    assert_eq!(train.images.len(), 1);
    assert_eq!(train.stats.filtered_empty_images, 1);
}

#[test]
fn category_id_labels_follow_the_ids() {
    let fixture = Fixture::new();
    let json = fixture.json(GOOD);
    let options = LoadOptions { labels: data::LabelLayout::CategoryId, ..LoadOptions::default() };
    let dataset = CocoDataset::load(&json, &fixture.dir.path().join("img"), options).unwrap();
    let contiguous = CocoDataset::load(&json, &fixture.dir.path().join("img"), LoadOptions::default()).unwrap();
    let largest = *dataset.categories.ids().last().unwrap();
    assert_eq!(dataset.categories.len(), largest as usize);
    for &id in dataset.categories.ids() {
        let label = dataset.categories.label(id).unwrap();
        assert_eq!(label, id as i64 - 1);
        assert_eq!(dataset.categories.category_id(label), Some(id));
        let contiguous_label = contiguous.categories.label(id).unwrap();
        assert_eq!(dataset.categories.name(label), contiguous.categories.name(contiguous_label));
    }
    let annotations = dataset.images.iter().flat_map(|r| &r.annotations);
    assert!(annotations.clone().count() > 0);
    for ann in annotations {
        assert_eq!(ann.label, ann.category_id as i64 - 1);
    }
}
