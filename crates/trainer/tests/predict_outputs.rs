//! `trainer predict` never writes over its inputs and gives every image a unique id and picture (issue 15,
//! item 2): the plan is checked without a model, then once end to end with a tiny trained one.

mod common;

use std::path::{Path, PathBuf};

use common::{stderr, temp_dir, tiny_config, trainer};
use trainer::predict::{id_mapping_path, image_files, plan_outputs};

fn touch(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        image::RgbImage::new(8, 8).save(dir.join(name)).unwrap();
    }
    image_files(dir).unwrap()
}

#[test]
fn ids_and_picture_names_are_unique() {
    let dir = temp_dir("predict-plan");
    let input = dir.join("in");
    let files = touch(&input, &["000003.png", "3.jpg", "a.png", "b.png", "x.jpg", "x.png"]);
    let plan = plan_outputs(&input, &files, &dir.join("out"), Some(&dir.join("results.json"))).unwrap();
    let ids: Vec<(String, u64, bool)> = plan
        .iter()
        .map(|p| (p.file.file_name().unwrap().to_str().unwrap().to_string(), p.image_id, p.id_from_name))
        .collect();
    // Sorted file order; `3.jpg` repeats id 3 and `a`, `b`, `x` have no number: fresh ids above the largest.
    let expected = [("000003.png", 3, true), ("3.jpg", 4, false), ("a.png", 5, false), ("b.png", 6, false)];
    for (got, want) in ids.iter().zip(expected) {
        assert_eq!((got.0.as_str(), got.1, got.2), want);
    }
    let pictures: Vec<String> =
        plan.iter().map(|p| p.picture.file_name().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(pictures, ["000003.png", "3.png", "a.png", "b.png", "x.jpg.png", "x.png.png"]);
    assert_eq!(id_mapping_path(&dir.join("results.json")), dir.join("results.image_ids.json"));
}

#[test]
fn outputs_that_would_overwrite_inputs_are_refused() {
    let dir = temp_dir("predict-refuse");
    let input = dir.join("in");
    let files = touch(&input, &["a.png", "b.png"]);
    let err = plan_outputs(&input, &files, &input, None).unwrap_err().to_string();
    assert!(err.contains("is the input folder"), "{err}");
    // The same folder spelled differently is still the input folder.
    let err = plan_outputs(&input, &files, &input.join("."), None).unwrap_err().to_string();
    assert!(err.contains("is the input folder"), "{err}");
    // One file as input, its own folder as output: its picture would replace it.
    let single = input.join("a.png");
    let err = plan_outputs(&single, std::slice::from_ref(&single), &input, None).unwrap_err().to_string();
    assert!(err.contains("would overwrite the input image") && err.contains("a.png"), "{err}");
    let err = plan_outputs(&input, &files, &dir.join("out"), Some(&input.join("b.png"))).unwrap_err().to_string();
    assert!(err.contains("would overwrite the input image") && err.contains("b.png"), "{err}");
}

#[test]
fn predict_into_its_input_folder_fails_and_leaves_the_images_alone() {
    let dir = temp_dir("predict-cli");
    let config = tiny_config(&dir);
    let out = dir.join("out");
    let output = trainer(&["train", &config, "--output", out.to_str().unwrap(), "--set", "solver.max_iter=1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let weights = out.join("model_0000001");
    let images = dir.join("shapes/val");
    // Two names without a number next to the numeric ones.
    std::fs::copy(images.join("000001.png"), images.join("cat.png")).unwrap();
    let before: Vec<Vec<u8>> = image_files(&images).unwrap().iter().map(|f| std::fs::read(f).unwrap()).collect();
    let args = |out_dir: &Path, json: &Path| {
        let list = ["predict", &config, "--weights", weights.to_str().unwrap(), "--input", images.to_str().unwrap()];
        let mut args: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        args.extend(
            ["--out", out_dir.to_str().unwrap(), "--score-thresh", "0", "--json", json.to_str().unwrap()]
                .map(String::from),
        );
        args
    };
    let run = |args: Vec<String>| trainer(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let output = run(args(&images, &dir.join("results.json")));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("is the input folder"), "{}", stderr(&output));
    let after: Vec<Vec<u8>> = image_files(&images).unwrap().iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(before, after, "the input images changed");

    let results = dir.join("results.json");
    let output = run(args(&dir.join("pictures"), &results));
    assert!(output.status.success(), "{}", stderr(&output));
    let mapping: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.image_ids.json")).unwrap()).unwrap();
    assert_eq!(mapping["000004.png"], 4);
    assert_eq!(mapping["cat.png"], 5);

    // A truncated JPEG (issue 15, item 1) is an error naming the file, not a picture of a half-grey image.
    let damaged = dir.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    let picture = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([((x * 7) ^ (y * 3)) as u8, (y * 11) as u8, 90]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    std::fs::write(damaged.join("000009.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let mut damaged_args = args(&dir.join("damaged-pictures"), &dir.join("damaged.json"));
    damaged_args[5] = damaged.to_str().unwrap().to_string();
    let output = run(damaged_args);
    let message = stderr(&output);
    assert!(!output.status.success(), "a truncated JPEG was predicted on");
    assert!(message.contains("000009.jpg") && message.contains("truncated JPEG"), "{message}");
}
