//! Image preprocessing as transformers' `Qwen2VLImageProcessorPil` (the processor transformers 5
//! uses without torchvision), for Qwen2-VL and Qwen2.5-VL.
//!
//! Stages: train / eval / score / generate (the images going into the vision tower). Reads the
//! checkpoint's `processor_config.json` (transformers 5: the image processor nested under
//! `image_processor`, a pixel-count `size` with `shortest_edge` / `longest_edge`) or the hub's
//! `preprocessor_config.json` (flat, `min_pixels` / `max_pixels`); writes flattened patches.
//!
//! The steps:
//! 1. decode and RGB conversion as misp's CLIP processor does them (limits, grey / CMYK / alpha);
//! 2. [`smart_resize`]: both sides to multiples of `patch_size * merge_size` (28), the pixel
//!    count within `[min_pixels, max_pixels]`, the aspect ratio kept as far as it can be;
//!    Python's `round` (half to even) and float arithmetic in the same order;
//! 3. PIL's bicubic resampler ([`crate::model::resample`]);
//! 4. `x / 255`, then `(x - mean) / std` per channel, in `f32` as the CLIP processor;
//! 5. patch flattening: patches of `patch_size` x `patch_size` ordered merge block by merge block
//!    (the 2 x 2 patches one language-model token merges are consecutive), each patch
//!    `[channel, temporal, y, x]` with the still frame repeated `temporal_patch_size` times.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Deserialize;

use crate::model::clip::image_processor::{
    ImageDecodeError, ImageProcessor as Decoder, CLIP_MEAN, CLIP_STD,
};
use crate::model::resample::{channel_values, resize, Resample};

/// One image's patches: `pixels [grid_h * grid_w, 3 * temporal * patch * patch]` row-major, and
/// `image_grid_thw` (temporal 1 for a still image).
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePatches {
    pub pixels: Vec<f32>,
    pub grid_h: usize,
    pub grid_w: usize,
}

impl ImagePatches {
    /// Patches in all.
    pub fn patches(&self) -> usize {
        self.grid_h * self.grid_w
    }

    /// Language-model tokens after the `merge x merge` merger.
    pub fn tokens(&self, merge: usize) -> usize {
        self.patches() / (merge * merge)
    }
}

/// `Qwen2VLImageProcessorPil`'s settings.
#[derive(Debug, Clone)]
pub struct QwenImageProcessor {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub resample: Resample,
    /// Decoding limits and RGB conversion.
    pub decoder: Decoder,
}

/// Errors reading the processor's configuration; each names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: `{field}`: {message}", path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// `size` of either layout: transformers 5's `shortest_edge` / `longest_edge` (pixel counts) or
/// transformers 4's `min_pixels` / `max_pixels`.
#[derive(Deserialize, Default)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

#[derive(Deserialize, Default)]
struct RawConfig {
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    resample: Option<u32>,
    image_processor_type: Option<String>,
    video_processor_type: Option<String>,
}

#[derive(Deserialize)]
struct RawProcessorConfig {
    image_processor: Option<RawConfig>,
    video_processor: Option<serde_json::Value>,
}

/// Why a processor config that describes only a video processor is refused.
const NO_VIDEO: &str = "video inputs are not supported: misp reads still images, and this \
     describes a video processor only (give the checkpoint's image processor config)";

impl Default for QwenImageProcessor {
    /// transformers' defaults: 56 x 56 to 28 x 28 x 1280 pixels, patch 14, temporal 2, merge 2,
    /// bicubic, CLIP mean and std.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            resample: Resample::Bicubic,
            decoder: Decoder::clip_default(224),
        }
    }
}

impl QwenImageProcessor {
    /// Reads `dir/processor_config.json`'s `image_processor` when the file has one, else
    /// `dir/preprocessor_config.json`, else transformers' defaults. Fields absent take the
    /// defaults; top-level `min_pixels` / `max_pixels` override `size`, as transformers reads them.
    pub fn from_dir(dir: &Path) -> Result<Self, ProcessorConfigError> {
        let nested = dir.join("processor_config.json");
        if let Some(text) = read_optional(&nested)? {
            let raw: RawProcessorConfig =
                serde_json::from_str(&text).map_err(|source| ProcessorConfigError::Json {
                    path: nested.clone(),
                    source,
                })?;
            if let Some(raw) = raw.image_processor {
                return Self::from_raw(raw, &nested);
            }
            if raw.video_processor.is_some() {
                return Err(ProcessorConfigError::Field {
                    path: nested,
                    field: "video_processor",
                    message: NO_VIDEO.into(),
                });
            }
        }
        let flat = dir.join("preprocessor_config.json");
        match read_optional(&flat)? {
            Some(text) => {
                let raw: RawConfig =
                    serde_json::from_str(&text).map_err(|source| ProcessorConfigError::Json {
                        path: flat.clone(),
                        source,
                    })?;
                Self::from_raw(raw, &flat)
            }
            None => Ok(Self::default()),
        }
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ProcessorConfigError> {
        let field = |field: &'static str, message: String| ProcessorConfigError::Field {
            path: path.to_path_buf(),
            field,
            message,
        };
        // transformers writes `video_processor_type` into a video processor's own file; a file
        // with it and no image processor's type cannot configure the images.
        if raw.video_processor_type.is_some() && raw.image_processor_type.is_none() {
            return Err(field("video_processor_type", NO_VIDEO.into()));
        }
        let mut p = Self::default();
        if let Some(s) = raw.size {
            if let Some(v) = s.shortest_edge.or(s.min_pixels) {
                p.min_pixels = v;
            }
            if let Some(v) = s.longest_edge.or(s.max_pixels) {
                p.max_pixels = v;
            }
        }
        p.min_pixels = raw.min_pixels.unwrap_or(p.min_pixels);
        p.max_pixels = raw.max_pixels.unwrap_or(p.max_pixels);
        p.patch_size = raw.patch_size.unwrap_or(p.patch_size);
        p.temporal_patch_size = raw.temporal_patch_size.unwrap_or(p.temporal_patch_size);
        p.merge_size = raw.merge_size.unwrap_or(p.merge_size);
        p.do_resize = raw.do_resize.unwrap_or(p.do_resize);
        p.do_rescale = raw.do_rescale.unwrap_or(p.do_rescale);
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        p.do_normalize = raw.do_normalize.unwrap_or(p.do_normalize);
        p.image_mean =
            channel_values(raw.image_mean, p.image_mean).map_err(|m| field("image_mean", m))?;
        p.image_std =
            channel_values(raw.image_std, p.image_std).map_err(|m| field("image_std", m))?;
        p.resample = Resample::from_pil(raw.resample).map_err(|m| field("resample", m))?;
        if p.patch_size == 0 || p.merge_size == 0 || p.temporal_patch_size == 0 {
            return Err(field(
                "patch_size",
                "patch_size, merge_size and temporal_patch_size must be positive".into(),
            ));
        }
        let unit = p.factor() * p.factor();
        if p.min_pixels == 0 || p.min_pixels > p.max_pixels || p.max_pixels < unit {
            return Err(field(
                "max_pixels",
                format!(
                    "need 0 < min_pixels ({}) <= max_pixels ({}) and max_pixels >= one {} x {} merge unit",
                    p.min_pixels,
                    p.max_pixels,
                    p.factor(),
                    p.factor()
                ),
            ));
        }
        Ok(p)
    }

    /// Side multiple of the resized image: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per flattened patch: `3 * temporal_patch_size * patch_size^2`.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Reads and decodes a file (errors as the CLIP processor's).
    pub fn decode_file(&self, path: &Path) -> Result<RgbImage, ImageDecodeError> {
        self.decoder.decode_file(path)
    }

    /// `(height, width)` the image is resized to.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize), String> {
        if !self.do_resize {
            let f = self.factor();
            if !height.is_multiple_of(f) || !width.is_multiple_of(f) {
                return Err(format!(
                    "do_resize is false and the image {width} x {height} is not a multiple of {f}"
                ));
            }
            return Ok((height, width));
        }
        smart_resize(
            height,
            width,
            self.factor(),
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Resizes, normalises and flattens one RGB image.
    pub fn patches(&self, img: &RgbImage) -> Result<ImagePatches, String> {
        let (h, w) = self.resized_size(img.height() as usize, img.width() as usize)?;
        let resized = if (w as u32, h as u32) == img.dimensions() {
            img.clone()
        } else {
            resize(img, w as u32, h as u32, self.resample)
        };
        let scale = if self.do_rescale {
            self.rescale_factor
        } else {
            1.0
        };
        // Channel planes of the normalised image.
        let mut planes = vec![0f32; 3 * h * w];
        for (i, p) in resized.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                let v = f32::from(p[c]) * scale;
                planes[c * h * w + i] = if self.do_normalize {
                    (v - self.image_mean[c]) / self.image_std[c]
                } else {
                    v
                };
            }
        }
        let (ps, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / ps, w / ps);
        let dim = self.patch_dim();
        let mut pixels = vec![0f32; gh * gw * dim];
        // Row order (block_h, block_w, in-block h, in-block w): transformers' transpose
        // `(1, 4, 2, 5, 0, 3, 6)` of `[C, gh/m, m, ps, gw/m, m, ps]`.
        let mut row = 0;
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py, px) = ((bh * m + mh) * ps, (bw * m + mw) * ps);
                        let out = &mut pixels[row * dim..][..dim];
                        for c in 0..3 {
                            for t in 0..tp {
                                for y in 0..ps {
                                    let src = &planes[c * h * w + (py + y) * w + px..][..ps];
                                    let o = ((c * tp + t) * ps + y) * ps;
                                    out[o..o + ps].copy_from_slice(src);
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        Ok(ImagePatches {
            pixels,
            grid_h: gh,
            grid_w: gw,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, ProcessorConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ProcessorConfigError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// transformers' `smart_resize`: `(height, width)` rounded to multiples of `factor` (Python's
/// `round`, half to even), scaled down to at most `max_pixels` (floor) or up to at least
/// `min_pixels` (ceil) keeping the aspect ratio. An aspect ratio above 200 is refused, as there.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err(format!("image of {width} x {height} pixels"));
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > 200.0 {
        return Err(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio:?}"
        ));
    }
    let mut h_bar = (hf / ff).round_ties_even() * ff;
    let mut w_bar = (wf / ff).round_ties_even() * ff;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((hf * wf) / max_pixels as f64).sqrt();
        h_bar = ff.max((hf / beta / ff).floor() * ff);
        w_bar = ff.max((wf / beta / ff).floor() * ff);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = (hf * beta / ff).ceil() * ff;
        w_bar = (wf * beta / ff).ceil() * ff;
    }
    Ok((h_bar as usize, w_bar as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even_and_clamps_pixels() {
        // 70 / 28 = 2.5 rounds to 2 (56), not 3; 105 / 28 = 3.75 to 4.
        assert_eq!(smart_resize(105, 70, 28, 3136, 7840).unwrap(), (112, 56));
        // 23 x 28 is below 3136 pixels: scaled up with ceil.
        assert_eq!(smart_resize(23, 28, 28, 3136, 7840).unwrap(), (56, 84));
        // 129 x 110 above 7840: scaled down with floor.
        assert_eq!(smart_resize(129, 110, 28, 3136, 7840).unwrap(), (84, 56));
        // A sliver thinner than one merge unit: each side at least one factor, scaled up past
        // max_pixels (transformers does not check again after scaling up).
        assert_eq!(smart_resize(1, 150, 28, 3136, 7840).unwrap(), (28, 700));
        assert!(smart_resize(1, 201, 28, 3136, 7840).is_err());
        assert!(smart_resize(0, 10, 28, 3136, 7840).is_err());
    }

    #[test]
    fn a_video_processor_config_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("misp-qwen-video-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            "processor_config.json",
            r#"{"video_processor": {"fps": 2.0}, "processor_class": "Qwen2_5_VLProcessor"}"#,
        );
        let e = QwenImageProcessor::from_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("processor_config.json")
                && e.contains("`video_processor`")
                && e.contains("video inputs are not supported"),
            "{e}"
        );
        std::fs::remove_file(dir.join("processor_config.json")).unwrap();
        write(
            "preprocessor_config.json",
            r#"{"video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0}"#,
        );
        let e = QwenImageProcessor::from_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("`video_processor_type`"),
            "{e}"
        );
        // Both processors nested (what transformers saves with torchvision): the images' is read.
        write(
            "processor_config.json",
            r#"{"image_processor": {"min_pixels": 3136, "max_pixels": 7840},
                "video_processor": {"fps": 2.0}}"#,
        );
        let p = QwenImageProcessor::from_dir(&dir).unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 7840));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
