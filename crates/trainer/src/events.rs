//! Training logs on disk: `metrics.jsonl` (one JSON object per logged iteration or evaluation) and TensorBoard
//! event files (scalars and PNG images), plus the `[log]` config section.
//!
//! The TensorBoard writer is our own (~100 lines): TFRecord framing with masked CRC32C and hand-encoded `Event` /
//! `Summary` protobuf messages. tensorboard-rs 0.5.9 was tried first and rejected: it panics on I/O errors in a
//! background thread, swaps width and height of non-square images, and pulls image 0.23 and protobuf 2.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sync_debug::CudaSyncDebug;

/// Errors in writing logs; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// An image whose pixel buffer does not match its size, or that PNG cannot encode.
    #[error("image `{tag}`: {message}")]
    Image { tag: String, message: String },
    /// A metrics record that is not a JSON object.
    #[error("{path}: a metrics record must be a JSON object")]
    NotAnObject { path: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EventsError + '_ {
    move |source| EventsError::Io { path: path.display().to_string(), source }
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log (console, `metrics.jsonl`, TensorBoard) every this many iterations.
    pub period: u64,
    /// Write TensorBoard event files under `output_dir/tensorboard`.
    pub tensorboard: bool,
    /// Plain log lines instead of a progress bar (non-interactive output).
    pub quiet: bool,
    /// Count every step's host syncs and host<->device copies (libtorch's operator counter and the `transfer`
    /// crate; on the CPU as they would happen on a GPU) and write them to `metrics.jsonl` per step at each log
    /// line. A diagnostic: the counter slows the steps.
    pub sync_counts: bool,
    /// CUDA's sync debug mode (`warn` or `error`) in the steps that read nothing on the host, after the first two
    /// of a run ([`crate::sync_debug`]); CUDA only.
    pub cuda_sync_debug: CudaSyncDebug,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            period: 20,
            tensorboard: true,
            quiet: false,
            sync_counts: false,
            cuda_sync_debug: CudaSyncDebug::Off,
        }
    }
}

/// Appends one JSON object per line to `metrics.jsonl`, flushing each line so a crash loses nothing logged.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending (created when missing).
    pub fn open(path: &Path) -> Result<Self, EventsError> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_error(path))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file })
    }

    /// Opens `path` after dropping the lines whose `"iteration"` is larger than `iteration` (records written after
    /// the checkpoint a run resumes from), so the file reads as one uninterrupted run.
    pub fn open_resumed(path: &Path, iteration: u64) -> Result<Self, EventsError> {
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io_error(path))?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("iteration").and_then(serde_json::Value::as_u64))
                        .is_none_or(|logged| logged <= iteration)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            std::fs::write(path, kept).map_err(io_error(path))?;
        }
        MetricsWriter::open(path)
    }

    /// Appends `record`, which must be a JSON object.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<(), EventsError> {
        if !record.is_object() {
            return Err(EventsError::NotAnObject { path: self.path.display().to_string() });
        }
        let line = format!("{record}\n");
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(io_error(&self.path))
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// CRC32C (Castagnoli), the checksum of TFRecord framing.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &byte| TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8))
}

/// TFRecord's masked CRC32C.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// Minimal protobuf encoding of the fields we write.
mod proto {
    /// Base-128 varint.
    pub(super) fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }
    /// Length-delimited field (strings, bytes, nested messages).
    pub(super) fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
        varint(out, ((field << 3) | 2) as u64);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    /// Varint field (int32, int64).
    pub(super) fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
        varint(out, (field << 3) as u64);
        varint(out, value);
    }
    /// 32-bit field (float).
    pub(super) fn f32_field(out: &mut Vec<u8>, field: u32, value: f32) {
        varint(out, ((field << 3) | 5) as u64);
        out.extend_from_slice(&value.to_le_bytes());
    }
    /// 64-bit field (double).
    pub(super) fn f64_field(out: &mut Vec<u8>, field: u32, value: f64) {
        varint(out, ((field << 3) | 1) as u64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// One `Summary.Value`.
enum SummaryValue<'a> {
    Scalar(f32),
    Png { width: u32, height: u32, png: &'a [u8] },
}

/// Writes a TensorBoard event file (`events.out.tfevents.*`) readable by TensorBoard and its `EventAccumulator`.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates `log_dir` and a new event file in it.
    pub fn create(log_dir: &Path) -> Result<Self, EventsError> {
        std::fs::create_dir_all(log_dir).map_err(io_error(log_dir))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string());
        let host = host.ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
        let now = wall_time();
        let path = log_dir.join(format!("events.out.tfevents.{:010}.{host}.{}.0", now as u64, std::process::id()));
        let file = File::create(&path).map_err(io_error(&path))?;
        let mut writer = EventWriter { path, file: BufWriter::new(file) };
        let mut event = Vec::new();
        proto::f64_field(&mut event, 1, now);
        proto::bytes_field(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<(), EventsError> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file.write_all(&record).map_err(io_error(&self.path))
    }

    fn write_summary(&mut self, step: u64, values: &[(&str, SummaryValue<'_>)]) -> Result<(), EventsError> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut encoded = Vec::new();
            proto::bytes_field(&mut encoded, 1, tag.as_bytes());
            match value {
                SummaryValue::Scalar(v) => proto::f32_field(&mut encoded, 2, *v),
                SummaryValue::Png { width, height, png } => {
                    let mut image = Vec::new();
                    proto::varint_field(&mut image, 1, *height as u64);
                    proto::varint_field(&mut image, 2, *width as u64);
                    proto::varint_field(&mut image, 3, 3);
                    proto::bytes_field(&mut image, 4, png);
                    proto::bytes_field(&mut encoded, 4, &image);
                }
            }
            proto::bytes_field(&mut summary, 1, &encoded);
        }
        let mut event = Vec::new();
        proto::f64_field(&mut event, 1, wall_time());
        proto::varint_field(&mut event, 2, step);
        proto::bytes_field(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Logs one scalar (stored as float32, as TensorBoard does).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<(), EventsError> {
        self.write_summary(step, &[(tag, SummaryValue::Scalar(value as f32))])
    }

    /// Logs several scalars of one step in one event.
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<(), EventsError> {
        let values: Vec<(&str, SummaryValue<'_>)> =
            scalars.iter().map(|(tag, value)| (*tag, SummaryValue::Scalar(*value as f32))).collect();
        self.write_summary(step, &values)
    }

    /// Logs an RGB image given as `height * width * 3` bytes, row-major (encoded as PNG).
    pub fn add_image_rgb(
        &mut self,
        tag: &str,
        width: u32,
        height: u32,
        rgb: &[u8],
        step: u64,
    ) -> Result<(), EventsError> {
        let png = encode_png(width, height, rgb).map_err(|message| EventsError::Image { tag: tag.into(), message })?;
        self.write_summary(step, &[(tag, SummaryValue::Png { width, height, png: &png })])
    }

    /// Pushes buffered events to the file.
    pub fn flush(&mut self) -> Result<(), EventsError> {
        self.file.flush().map_err(io_error(&self.path))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Errors here have nowhere to go; callers who care call `flush` first.
        let _ = self.file.flush();
    }
}

/// Encodes an RGB8 image (`height * width * 3` bytes, row-major) as PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, String> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected || width == 0 || height == 0 {
        return Err(format!("{width}x{height} RGB needs {expected} bytes, got {}", rgb.len()));
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn bad_images_and_records_are_errors() {
        assert!(encode_png(2, 2, &[0; 11]).unwrap_err().contains("needs 12 bytes"));
        let dir = tempfile::tempdir().unwrap();
        let mut metrics = MetricsWriter::open(&dir.path().join("metrics.jsonl")).unwrap();
        assert!(metrics.write(&serde_json::json!([1, 2])).is_err());
    }
}
