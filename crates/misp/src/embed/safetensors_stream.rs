//! Writing a large safetensors file without holding its tensors in memory: the header is
//! computed from the shapes, then each tensor's bytes are streamed in row blocks.
//!
//! Used by the embed stage's final merge so that peak memory stays flat in the pool size.

use std::io::Write;
use std::path::Path;

use crate::files::{self, FileError};

/// Element type of a streamed tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamDType {
    F16,
    F32,
}

impl StreamDType {
    fn name(self) -> &'static str {
        match self {
            StreamDType::F16 => "F16",
            StreamDType::F32 => "F32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StreamDType::F16 => 2,
            StreamDType::F32 => 4,
        }
    }

    /// Little-endian bytes of `values` in this dtype.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            StreamDType::F16 => {
                for v in values {
                    out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            StreamDType::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// One 2-D tensor to stream: its name, shape `[rows, cols]`, and a source that yields its rows
/// in order as blocks of `f32` (any block sizes summing to `rows * cols`).
pub struct StreamTensor<'a> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub blocks: Box<dyn Iterator<Item = Result<Vec<f32>, FileError>> + 'a>,
}

/// Writes `tensors` (in the given order) as one safetensors file at `path`, atomically.
pub fn write(
    path: &Path,
    dtype: StreamDType,
    tensors: Vec<StreamTensor<'_>>,
) -> Result<(), FileError> {
    // Header: {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...}, padded with
    // spaces to a multiple of 8 bytes as the reference implementation does.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &tensors {
        let len = t.rows * t.cols * dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": [t.rows, t.cols], "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    files::write_atomic_with(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        let mut buf = Vec::new();
        for t in tensors {
            let want = t.rows * t.cols;
            let mut got = 0;
            for block in t.blocks {
                let block = block.map_err(|e| std::io::Error::other(e.to_string()))?;
                got += block.len();
                buf.clear();
                dtype.encode(&block, &mut buf);
                f.write_all(&buf)?;
            }
            if got != want {
                return Err(std::io::Error::other(format!(
                    "tensor `{}`: streamed {got} values, expected {want}",
                    t.name
                )));
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn streamed_file_reads_back_with_candle() {
        let path =
            std::env::temp_dir().join(format!("misp-stream-{}.safetensors", std::process::id()));
        for dtype in [StreamDType::F16, StreamDType::F32] {
            let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..6).map(|i| -(i as f32)).collect();
            let blocks_a = vec![Ok(a[..5].to_vec()), Ok(a[5..].to_vec())];
            let tensors = vec![
                StreamTensor {
                    name: "a".into(),
                    rows: 4,
                    cols: 3,
                    blocks: Box::new(blocks_a.into_iter()),
                },
                StreamTensor {
                    name: "b".into(),
                    rows: 2,
                    cols: 3,
                    blocks: Box::new(std::iter::once(Ok(b.clone()))),
                },
            ];
            write(&path, dtype, tensors).unwrap();
            let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let got_a: Vec<f32> = loaded["a"]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got_a, a);
            assert_eq!(loaded["b"].dims(), &[2, 3]);
            let want = if dtype == StreamDType::F16 {
                DType::F16
            } else {
                DType::F32
            };
            assert_eq!(loaded["b"].dtype(), want);
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_short_stream_is_an_error_and_leaves_no_file() {
        let path = std::env::temp_dir().join(format!(
            "misp-stream-short-{}.safetensors",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let tensors = vec![StreamTensor {
            name: "a".into(),
            rows: 2,
            cols: 2,
            blocks: Box::new(std::iter::once(Ok(vec![1.0]))),
        }];
        assert!(write(&path, StreamDType::F32, tensors).is_err());
        assert!(!path.exists());
    }
}
