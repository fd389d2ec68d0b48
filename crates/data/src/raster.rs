//! Polygon rasterisation with pycocotools' algorithm (`hotcoco`'s `frPyObjects` + `merge` + `decode`), the one
//! implementation every mask target uses: the loader's full-image bitmaps (`input.mask_format = "bitmask"`) and
//! the detector's polygons rasterised inside each RoI (detectron2's polygon format).

/// Polygons with fewer than three points cannot be rasterised (pycocotools would read four numbers as a box); they
/// are skipped, as detectron2's dataset loader drops them.
pub const MIN_POLYGON_COORDS: usize = 6;

/// Rasterises polygons (flat `[x0, y0, x1, y1, ..]` lists in mask pixels, the union of all of them) into `out`, a
/// row-major `height x width` mask of 0/1. Polygons of fewer than three points are skipped; `height * width` must
/// fit in a u32 (pycocotools' RLE counts are 32-bit).
pub fn rasterize_polygons_into(polygons: &[Vec<f64>], height: usize, width: usize, out: &mut [u8]) {
    assert_eq!(out.len(), height * width, "mask buffer of {height} x {width}");
    let kept: Vec<&Vec<f64>> = polygons.iter().filter(|polygon| polygon.len() >= MIN_POLYGON_COORDS).collect();
    if kept.is_empty() {
        out.fill(0);
        return;
    }
    let kept: Vec<Vec<f64>> = kept.into_iter().cloned().collect();
    let (h, w) = (u32::try_from(height).expect("mask height fits in u32"), u32::try_from(width).expect("fits"));
    let rle = hotcoco::mask::fr_polys(&kept, h, w).expect("mask of at most u32::MAX pixels");
    // hotcoco decodes column-major, like pycocotools.
    let column_major = hotcoco::mask::decode(&rle);
    for (x, column) in column_major.chunks_exact(height).enumerate() {
        for (y, &value) in column.iter().enumerate() {
            out[y * width + x] = value;
        }
    }
}

/// [`rasterize_polygons_into`] a new row-major `height x width` buffer.
pub fn rasterize_polygons(polygons: &[Vec<f64>], height: usize, width: usize) -> Vec<u8> {
    let mut mask = vec![0u8; height * width];
    rasterize_polygons_into(polygons, height, width, &mut mask);
    mask
}
