//! Drawing predictions onto images: translucent masks, box outlines and `class score` labels in an 8x8 bitmap
//! font (no font files needed). Used by `predict` and by the TensorBoard images written at each evaluation.

use data::transform::RgbImage;

/// One detection to draw, in the image's pixels.
#[derive(Debug, Clone)]
pub struct DrawnDetection {
    /// `x1, y1, x2, y2`.
    pub bbox: [f64; 4],
    /// Label text, e.g. `dog 0.87`.
    pub text: String,
    /// Colour index (the class), so one class keeps one colour.
    pub class: usize,
    /// Optional `height * width` 0/1 mask.
    pub mask: Option<Vec<u8>>,
}

const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
];

fn blend(image: &mut RgbImage, x: i64, y: i64, colour: [u8; 3], alpha: f32) {
    if x < 0 || y < 0 || x >= image.width as i64 || y >= image.height as i64 {
        return;
    }
    let i = (y as usize * image.width as usize + x as usize) * 3;
    for (c, value) in colour.iter().enumerate() {
        let old = image.data[i + c] as f32;
        image.data[i + c] = (old * (1.0 - alpha) + *value as f32 * alpha).round() as u8;
    }
}

fn draw_text(image: &mut RgbImage, x: i64, y: i64, text: &str, colour: [u8; 3]) {
    let width = 8 * text.chars().count() as i64 + 2;
    for dy in 0..10 {
        for dx in 0..width {
            blend(image, x + dx, y + dy, colour, 0.85);
        }
    }
    for (k, ch) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY.get(ch as usize).copied().unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    blend(image, x + 1 + 8 * k as i64 + col, y + 1 + row as i64, [255, 255, 255], 1.0);
                }
            }
        }
    }
}

/// Draws every detection onto `image` (masks first, then boxes and labels on top).
pub fn draw(image: &mut RgbImage, detections: &[DrawnDetection]) {
    let (w, h) = (image.width as usize, image.height as usize);
    for det in detections {
        let colour = PALETTE[det.class % PALETTE.len()];
        if let Some(mask) = &det.mask {
            for (i, &m) in mask.iter().enumerate().take(w * h) {
                if m != 0 {
                    blend(image, (i % w) as i64, (i / w) as i64, colour, 0.45);
                }
            }
        }
    }
    for det in detections {
        let colour = PALETTE[det.class % PALETTE.len()];
        let [x1, y1, x2, y2] = det.bbox.map(|v| v.round() as i64);
        for t in 0..2 {
            for x in x1..=x2 {
                blend(image, x, y1 + t, colour, 1.0);
                blend(image, x, y2 - t, colour, 1.0);
            }
            for y in y1..=y2 {
                blend(image, x1 + t, y, colour, 1.0);
                blend(image, x2 - t, y, colour, 1.0);
            }
        }
        let text_y = if y1 >= 10 { y1 - 10 } else { y1 };
        draw_text(image, x1, text_y, &det.text, colour);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_mask_box_and_text_pixels() {
        let mut image = RgbImage { width: 64, height: 48, data: vec![0; 64 * 48 * 3] };
        let mut mask = vec![0u8; 64 * 48];
        mask[30 * 64 + 30] = 1;
        let det = DrawnDetection { bbox: [10.0, 20.0, 40.0, 40.0], text: "ab".into(), class: 0, mask: Some(mask) };
        draw(&mut image, &[det]);
        let pixel = |x: usize, y: usize| &image.data[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
        assert_eq!(pixel(10, 30), &PALETTE[0]);
        assert_eq!(pixel(30, 30), &[104, 11, 34]);
        assert_eq!(pixel(0, 0), &[0, 0, 0]);
        assert!((10..28).any(|x| (10..20).any(|y| pixel(x, y) == [255, 255, 255])));
    }
}
