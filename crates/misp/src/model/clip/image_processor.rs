//! Image preprocessing identical in intent to transformers' `CLIPImageProcessor` (its PIL
//! backend, `CLIPImageProcessorPil` in transformers 5).
//!
//! Stages: embed (the pool and record images going into CLIP) and, later, train / eval (LLaVA's
//! vision tower). Reads encoded image bytes and the checkpoint's `preprocessor_config.json`;
//! writes `[3, S, S]` channel-first `f32` pixel tensors.
//!
//! The steps and the reference they follow:
//! 1. decode with size and allocation limits ([`ImageProcessor::decode`]): zero-size, enormous,
//!    truncated, corrupt and non-image inputs are classified errors, never panics;
//! 2. RGB conversion as transformers' `convert_to_rgb`: grayscale replicated, CMYK converted,
//!    transparency composited onto white (transformers >= 5; PIL's own `convert("RGB")`, which
//!    transformers 4 used, drops alpha instead: [`AlphaMode`]), 16-bit samples reduced to their
//!    high byte as PIL does for 16-bit RGB PNGs;
//! 3. optional LLaVA-1.5 `expand2square` padding with the mean colour;
//! 4. shortest side to `size.shortest_edge` with PIL's bicubic resampler, re-implemented below
//!    bit for bit (fixed-point coefficients, `u8` rounding between the two passes), the long side
//!    `int(shortest_edge * long / short)` as transformers' `get_resize_output_image_size`;
//! 5. centre crop with transformers' `center_crop` offsets (zero padding when the crop is larger);
//! 6. `x / 255`, then `(x - mean) / std` per channel.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits, RgbImage};
use serde::Deserialize;

use crate::model::resample::channel_values;
use crate::model::resample::resize_window;
pub use crate::model::resample::{resize, Resample};

/// The CLIP mean of transformers' `OPENAI_CLIP_MEAN`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The CLIP standard deviation of transformers' `OPENAI_CLIP_STD`, digit for digit as there.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Images with more pixels than this are refused before decoding. PIL refuses twice its
/// `MAX_IMAGE_PIXELS` (89.5 M) as a decompression bomb; 100 M pixels (a 10000 x 10000 photo) is
/// far above any dataset photo and still only 300 MB of RGB.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Decoder allocation limit: a 100 M pixel RGBA16 decode needs 800 MB; 1 GiB leaves headroom
/// without letting one bad file take the machine's memory when many decode in parallel.
pub const DEFAULT_MAX_ALLOC: u64 = 1 << 30;

/// Why an image could not be decoded. [`ImageDecodeError::reason`] is the short tag the embed
/// driver writes to `skipped.jsonl`.
#[derive(Debug, thiserror::Error)]
pub enum ImageDecodeError {
    #[error("image file is missing: {0}")]
    Missing(String),
    #[error("image file is empty (zero bytes)")]
    Empty,
    #[error("image file cannot be read: {0}")]
    Unreadable(String),
    #[error("image data is truncated: {0}")]
    Truncated(String),
    #[error("image data is corrupt: {0}")]
    Corrupt(String),
    #[error("not an image or an unsupported format: {0}")]
    NotAnImage(String),
    #[error("image has zero size ({width} x {height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("image is too large: {0}")]
    TooLarge(String),
}

impl ImageDecodeError {
    /// A short, stable tag for reports: `missing`, `empty`, `unreadable`, `truncated`, `corrupt`,
    /// `not-an-image`, `zero-size` or `too-large`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing",
            Self::Empty => "empty",
            Self::Unreadable(_) => "unreadable",
            Self::Truncated(_) => "truncated",
            Self::Corrupt(_) => "corrupt",
            Self::NotAnImage(_) => "not-an-image",
            Self::ZeroSize { .. } => "zero-size",
            Self::TooLarge(_) => "too-large",
        }
    }
}

/// Errors reading a checkpoint's `preprocessor_config.json`.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessConfigError {
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
    #[error("{}: field `{field}`: {message}", path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// What to do with transparency when converting to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaMode {
    /// Composite onto opaque white with PIL's `alpha_composite` arithmetic: transformers >= 5's
    /// `convert_to_rgb`, the reference of the conformance fixture.
    #[default]
    CompositeWhite,
    /// Drop the alpha channel: PIL's `convert("RGB")`, as transformers 4 did.
    Drop,
}

/// CLIP image preprocessing, configured from a checkpoint folder.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    /// Target of the short side (`size.shortest_edge`).
    pub shortest_edge: usize,
    /// `(height, width)` of the centre crop (`crop_size`).
    pub crop: (usize, usize),
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub resample: Resample,
    pub alpha: AlphaMode,
    /// Pad to a square with the mean colour before resizing (original LLaVA-1.5's
    /// `expand2square`); off by default, as in llava-hf and CLIP.
    pub pad_to_square: bool,
    /// Decoder limits of [`ImageProcessor::decode`].
    pub max_pixels: u64,
    pub max_alloc: u64,
}

/// `size` / `crop_size` as they appear in `preprocessor_config.json`: a bare integer (older
/// saves) or a dictionary.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeField {
    Int(usize),
    Dict {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    size: Option<SizeField>,
    crop_size: Option<SizeField>,
    do_resize: Option<bool>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    resample: Option<u32>,
}

impl ImageProcessor {
    /// CLIP defaults for a model of `image_size` pixels: shortest edge and square crop both
    /// `image_size`, bicubic, CLIP mean / std.
    pub fn clip_default(image_size: usize) -> Self {
        Self {
            shortest_edge: image_size,
            crop: (image_size, image_size),
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            resample: Resample::Bicubic,
            alpha: AlphaMode::default(),
            pad_to_square: false,
            max_pixels: DEFAULT_MAX_PIXELS,
            max_alloc: DEFAULT_MAX_ALLOC,
        }
    }

    /// Reads `dir/preprocessor_config.json` when present; otherwise [`Self::clip_default`] of
    /// `image_size` (the vision config's). Fields absent from the file take CLIP's defaults.
    pub fn from_checkpoint(dir: &Path, image_size: usize) -> Result<Self, PreprocessConfigError> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Self::clip_default(image_size);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(source) => return Err(PreprocessConfigError::Io { path, source }),
        };
        let raw: RawConfig =
            serde_json::from_str(&text).map_err(|source| PreprocessConfigError::Json {
                path: path.clone(),
                source,
            })?;
        let field = |field: &'static str, message: String| PreprocessConfigError::Field {
            path: path.clone(),
            field,
            message,
        };
        match raw.size {
            None => {}
            Some(SizeField::Int(s)) => p.shortest_edge = s,
            Some(SizeField::Dict {
                shortest_edge: Some(s),
                ..
            }) => p.shortest_edge = s,
            Some(SizeField::Dict { .. }) => {
                return Err(field(
                    "size",
                    "only `shortest_edge` resizing (CLIP's) is supported".into(),
                ))
            }
        }
        match raw.crop_size {
            None => {}
            Some(SizeField::Int(s)) => p.crop = (s, s),
            Some(SizeField::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => p.crop = (h, w),
            Some(SizeField::Dict { .. }) => {
                return Err(field("crop_size", "needs `height` and `width`".into()))
            }
        }
        p.do_resize = raw.do_resize.unwrap_or(p.do_resize);
        p.do_center_crop = raw.do_center_crop.unwrap_or(p.do_center_crop);
        p.do_rescale = raw.do_rescale.unwrap_or(p.do_rescale);
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        p.do_normalize = raw.do_normalize.unwrap_or(p.do_normalize);
        p.image_mean =
            channel_values(raw.image_mean, p.image_mean).map_err(|m| field("image_mean", m))?;
        p.image_std =
            channel_values(raw.image_std, p.image_std).map_err(|m| field("image_std", m))?;
        p.resample = Resample::from_pil(raw.resample).map_err(|m| field("resample", m))?;
        if p.shortest_edge == 0 || p.crop.0 == 0 || p.crop.1 == 0 {
            return Err(field("size", "sizes must be positive".into()));
        }
        Ok(p)
    }

    /// `(height, width)` of the tensors [`Self::pixels`] returns: the crop, or (without a crop)
    /// the resized size, which depends on the image.
    pub fn output_size(&self, img: &RgbImage) -> (usize, usize) {
        if self.do_center_crop {
            return self.crop;
        }
        let (w, h) = if self.pad_to_square {
            let s = img.width().max(img.height());
            (s, s)
        } else {
            img.dimensions()
        };
        if self.do_resize {
            let (rh, rw) = resize_output_size(h as usize, w as usize, self.shortest_edge);
            (rh, rw)
        } else {
            (h as usize, w as usize)
        }
    }

    /// Reads and decodes a file; a missing file is [`ImageDecodeError::Missing`].
    pub fn decode_file(&self, path: &Path) -> Result<RgbImage, ImageDecodeError> {
        let bytes = std::fs::read(path).map_err(|e| {
            let what = format!("{}: {e}", path.display());
            if e.kind() == std::io::ErrorKind::NotFound {
                ImageDecodeError::Missing(what)
            } else {
                ImageDecodeError::Unreadable(what)
            }
        })?;
        self.decode(&bytes)
    }

    /// Decodes encoded bytes (format sniffed from the content) to 8-bit RGB, within the limits.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ImageDecodeError> {
        if bytes.is_empty() {
            return Err(ImageDecodeError::Empty);
        }
        let reader = || {
            ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| ImageDecodeError::Unreadable(e.to_string()))
        };
        if let Some((width, height)) = png_zero_size(bytes) {
            return Err(ImageDecodeError::ZeroSize { width, height });
        }
        let r = reader()?;
        if r.format().is_none() {
            return Err(ImageDecodeError::NotAnImage(
                "no known image signature".into(),
            ));
        }
        // Header first: a zero-size or enormous image is refused before any pixel is decoded.
        let (width, height) = r.into_dimensions().map_err(classify)?;
        if width == 0 || height == 0 {
            return Err(ImageDecodeError::ZeroSize { width, height });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(ImageDecodeError::TooLarge(format!(
                "{width} x {height} = {pixels} pixels, limit {}",
                self.max_pixels
            )));
        }
        let mut r = reader()?;
        let mut limits = Limits::default();
        limits.max_alloc = Some(self.max_alloc);
        r.limits(limits);
        let img = r.decode().map_err(classify)?;
        if is_truncated_jpeg(bytes) {
            // zune-jpeg fills a cut-off scan with grey instead of failing; PIL refuses such a
            // file ("image file is truncated"), and a half-grey photo is a silently wrong input.
            return Err(ImageDecodeError::Truncated(
                "JPEG has no end-of-image marker".into(),
            ));
        }
        Ok(to_rgb(img, self.alpha))
    }

    /// The `[3, H, W]` channel-first pixel tensor (`H x W` = [`Self::output_size`]).
    pub fn pixels(&self, img: &RgbImage) -> Vec<f32> {
        let mut img = Cow::Borrowed(img);
        if self.pad_to_square {
            img = Cow::Owned(expand_to_square(&img, self.mean_colour()));
        }
        // The resized size, then the crop's place in it; only the part of the resized image
        // the crop keeps is computed.
        let (ih, iw) = if self.do_resize {
            resize_output_size(
                img.height() as usize,
                img.width() as usize,
                self.shortest_edge,
            )
        } else {
            (img.height() as usize, img.width() as usize)
        };
        let (h, w) = if self.do_center_crop {
            self.crop
        } else {
            (ih, iw)
        };
        let (top, left) = crop_offsets(ih as i64, iw as i64, h as i64, w as i64);
        // Rows and columns of the resized image inside the crop (a crop larger than the image
        // also covers transformers' zero padding around it).
        let span = |start: i64, len: usize, size: usize| {
            let a = start.clamp(0, size as i64) as usize;
            let b = (start + len as i64).clamp(0, size as i64) as usize;
            a..b.max(a)
        };
        let (rows, cols) = (span(top, h, ih), span(left, w, iw));
        let resized = (iw as u32, ih as u32) != img.dimensions();
        let window = if resized {
            resize_window(
                &img,
                (iw as u32, ih as u32),
                self.resample,
                (rows.clone(), cols.clone()),
            )
        } else {
            let raw = img.as_raw();
            rows.clone()
                .flat_map(|y| &raw[(y * iw + cols.start) * 3..(y * iw + cols.end) * 3])
                .copied()
                .collect()
        };
        let scale = if self.do_rescale {
            self.rescale_factor
        } else {
            1.0
        };
        // Outside the window (a crop larger than the resized image) is transformers' zero
        // padding, applied before rescaling.
        let (y0, x0) = (
            (rows.start as i64 - top) as usize,
            (cols.start as i64 - left) as usize,
        );
        let win_w = cols.len();
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let (mean, std) = if self.do_normalize {
                (self.image_mean[c], self.image_std[c])
            } else {
                (0.0, 1.0)
            };
            let plane = &mut out[c * h * w..][..h * w];
            plane.fill((0.0 * scale - mean) / std);
            for y in 0..rows.len() {
                let dst = &mut plane[(y0 + y) * w + x0..][..win_w];
                let src = &window[y * win_w * 3..][..win_w * 3];
                for (o, p) in dst.iter_mut().zip(src.chunks_exact(3)) {
                    *o = (f32::from(p[c]) * scale - mean) / std;
                }
            }
        }
        out
    }

    /// LLaVA's background colour: `tuple(int(x * 255) for x in image_mean)`.
    fn mean_colour(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }
}

/// Maps decoder errors to the report's classes.
fn classify(e: image::ImageError) -> ImageDecodeError {
    use image::error::{ImageError, LimitErrorKind};
    match e {
        ImageError::Limits(l) => match l.kind() {
            LimitErrorKind::DimensionError | LimitErrorKind::InsufficientMemory => {
                ImageDecodeError::TooLarge(l.to_string())
            }
            _ => ImageDecodeError::TooLarge(l.to_string()),
        },
        ImageError::Unsupported(u) => ImageDecodeError::NotAnImage(u.to_string()),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageDecodeError::Truncated(io.to_string())
        }
        ImageError::IoError(io) => ImageDecodeError::Corrupt(io.to_string()),
        ImageError::Decoding(d) => {
            let msg = d.to_string();
            let lower = msg.to_lowercase();
            if lower.contains("eof")
                || lower.contains("end of file")
                || lower.contains("truncat")
                || lower.contains("unexpected end")
                || lower.contains("no more bytes")
            {
                ImageDecodeError::Truncated(msg)
            } else {
                ImageDecodeError::Corrupt(msg)
            }
        }
        ImageError::Parameter(p) => ImageDecodeError::Corrupt(p.to_string()),
        ImageError::Encoding(x) => ImageDecodeError::Corrupt(x.to_string()),
    }
}

/// The PNG decoder refuses a zero dimension as a generic format error; reading the IHDR here
/// keeps such files in the `zero-size` class. `Some((w, h))` only for a PNG with a zero side.
fn png_zero_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    (w == 0 || h == 0).then_some((w, h))
}

/// A JPEG whose data stops before its end-of-image marker (`FF D9`). Writers may append bytes
/// after the marker (thumbnails, padding), so the marker is looked for near the end, not only
/// at it.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    !tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// RGB conversion as transformers' `convert_to_rgb` (module docs, step 2).
fn to_rgb(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    // 16-bit to 8-bit keeps the high byte: PIL's unpacker for 16-bit PNGs ("RGB;16B").
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma8(i) => RgbImage::from_fn(w, h, |x, y| {
            let l = i.get_pixel(x, y)[0];
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageLumaA8(i) => RgbImage::from_fn(w, h, |x, y| {
            let [l, a] = i.get_pixel(x, y).0;
            flatten([l, l, l], a, alpha)
        }),
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = i.get_pixel(x, y).0;
            flatten([r, g, b], a, alpha)
        }),
        DynamicImage::ImageLuma16(i) => RgbImage::from_fn(w, h, |x, y| {
            let l = hi(i.get_pixel(x, y)[0]);
            image::Rgb([l, l, l])
        }),
        DynamicImage::ImageLumaA16(i) => RgbImage::from_fn(w, h, |x, y| {
            let [l, a] = i.get_pixel(x, y).0.map(hi);
            flatten([l, l, l], a, alpha)
        }),
        DynamicImage::ImageRgb16(i) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb(i.get_pixel(x, y).0.map(hi)))
        }
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = i.get_pixel(x, y).0.map(hi);
            flatten([r, g, b], a, alpha)
        }),
        other => {
            let rgba = other.to_rgba8();
            RgbImage::from_fn(w, h, |x, y| {
                let [r, g, b, a] = rgba.get_pixel(x, y).0;
                flatten([r, g, b], a, alpha)
            })
        }
    }
}

/// One pixel over opaque white with PIL's `ImagingAlphaComposite` integer arithmetic
/// (7 fractional bits, `SHIFTFORDIV255`), or the colour alone when alpha is dropped.
fn flatten(rgb: [u8; 3], a: u8, mode: AlphaMode) -> image::Rgb<u8> {
    if mode == AlphaMode::Drop || a == 255 {
        return image::Rgb(rgb);
    }
    if a == 0 {
        return image::Rgb([255, 255, 255]);
    }
    const BITS: u32 = 7;
    let a = u32::from(a);
    // Destination alpha is 255, so `outa255 = 255 * 255` and the two coefficients simplify.
    let coef1 = a * 255 * 255 * (1 << BITS) / (255 * 255);
    let coef2 = 255 * (1 << BITS) - coef1;
    let div255 = |v: u32| ((v >> 8) + v) >> 8;
    image::Rgb(rgb.map(|c| {
        let t = u32::from(c) * coef1 + 255 * coef2 + (0x80 << BITS);
        (div255(t) >> BITS) as u8
    }))
}

/// LLaVA-1.5's `expand2square`: the image pasted centred (offset floored) on a square of
/// `background`.
fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let s = w.max(h);
    let mut out = RgbImage::from_pixel(s, s, image::Rgb(background));
    let (ox, oy) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    for (x, y, p) in img.enumerate_pixels() {
        out.put_pixel(x + ox, y + oy, *p);
    }
    out
}

/// transformers' `get_resize_output_image_size(size=shortest_edge, default_to_square=False)`:
/// `(height, width)` with the short side `shortest_edge` and the long side
/// `int(shortest_edge * long / short)` (float division, truncated).
pub fn resize_output_size(height: usize, width: usize, shortest_edge: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (shortest_edge as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, shortest_edge)
    } else {
        (shortest_edge, new_long)
    }
}

/// transformers' `center_crop` offsets `(top, left)` in the source's coordinates. An axis the
/// crop fits in starts at `(orig - crop) // 2`. On an axis where the crop is larger,
/// transformers pads to the crop size with the image at `ceil((crop - orig) / 2)` and keeps the
/// whole padded axis, so the crop starts that far before the image (the caller fills with 0).
fn crop_offsets(h: i64, w: i64, crop_h: i64, crop_w: i64) -> (i64, i64) {
    let axis = |orig: i64, crop: i64| {
        if crop <= orig {
            (orig - crop) / 2
        } else {
            -((crop - orig + 1) / 2)
        }
    };
    (axis(h, crop_h), axis(w, crop_w))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of the given header size whose (empty) pixel data never decodes: enough for the
    /// header checks, which must refuse it before any pixel is read.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let empty_zlib = [0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
        for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &empty_zlib), (b"IEND", &[])] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        }
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn enormous_and_zero_size_headers_are_refused_before_decoding() {
        let p = ImageProcessor::clip_default(224);
        let big = p.decode(&png_header(20_000, 20_000)).unwrap_err();
        assert_eq!(big.reason(), "too-large", "{big}");
        let zero = p.decode(&png_header(0, 10)).unwrap_err();
        assert_eq!(zero.reason(), "zero-size", "{zero}");
    }

    #[test]
    fn output_size_follows_transformers_rounding() {
        // int(224 * 500 / 333) = 336 (float division, truncated).
        assert_eq!(resize_output_size(333, 500, 224), (224, 336));
        assert_eq!(resize_output_size(500, 333, 224), (336, 224));
        assert_eq!(resize_output_size(100, 100, 224), (224, 224));
    }

    #[test]
    fn crop_offsets_match_center_crop() {
        assert_eq!(crop_offsets(10, 13, 4, 4), (3, 4));
        // Crop larger than the image: the image sits at ceil((crop - orig) / 2) in the output.
        assert_eq!(crop_offsets(3, 10, 6, 4), (-2, 3));
        assert_eq!(crop_offsets(4, 10, 6, 4), (-1, 3));
    }

    #[test]
    fn resampler_keeps_flat_images_flat_and_is_identity_at_same_size() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 0]));
        for (w, h) in [(11, 7), (80, 50), (37, 5), (3, 23)] {
            let out = resize(&img, w, h, Resample::Bicubic);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 10, 0]), "{w}x{h}");
        }
        let noise = RgbImage::from_fn(9, 9, |x, y| image::Rgb([(x * 29 + y * 7) as u8, 1, 2]));
        assert_eq!(resize(&noise, 9, 9, Resample::Bicubic), noise);
    }

    #[test]
    fn a_resized_window_is_that_crop_of_the_whole_resized_image() {
        let noise = RgbImage::from_fn(41, 29, |x, y| {
            let v = (x * 73 + y * 151 + x * y * 7) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        // Down and up in each axis, one axis unchanged, and windows touching each border.
        for (w, h) in [(17, 13), (90, 60), (41, 11), (13, 29)] {
            for filter in [Resample::Bicubic, Resample::Bilinear] {
                let full = resize(&noise, w, h, filter);
                let full = &full;
                for (rows, cols) in [(0..h, 0..w), (2..h - 1, 3..w - 2), (0..1, w - 1..w)] {
                    let (rows, cols) = (rows as std::ops::Range<u32>, cols as std::ops::Range<u32>);
                    let got = resize_window(
                        &noise,
                        (w, h),
                        filter,
                        (
                            rows.start as usize..rows.end as usize,
                            cols.start as usize..cols.end as usize,
                        ),
                    );
                    let want: Vec<u8> = rows
                        .clone()
                        .flat_map(|y| cols.clone().flat_map(move |x| full.get_pixel(x, y).0))
                        .collect();
                    assert_eq!(got, want, "{w}x{h} {filter:?} rows {rows:?} cols {cols:?}");
                }
            }
        }
    }

    #[test]
    fn alpha_compositing_matches_pil() {
        // PIL: Image.alpha_composite(white, (r, g, b, a)) for a few values.
        assert_eq!(flatten([0, 0, 0], 0, AlphaMode::CompositeWhite).0, [255; 3]);
        assert_eq!(
            flatten([10, 20, 30], 255, AlphaMode::CompositeWhite).0,
            [10, 20, 30]
        );
        assert_eq!(
            flatten([0, 100, 255], 128, AlphaMode::CompositeWhite).0,
            [127, 177, 255]
        );
        assert_eq!(
            flatten([0, 100, 255], 128, AlphaMode::Drop).0,
            [0, 100, 255]
        );
    }

    #[test]
    fn sixteen_bit_keeps_the_high_byte_and_grey_is_replicated() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0x12FF, 0xFF00])
            .unwrap();
        let rgb = to_rgb(DynamicImage::ImageLuma16(img), AlphaMode::CompositeWhite);
        assert_eq!(rgb.get_pixel(0, 0).0, [0x12; 3]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0xFF; 3]);
    }

    #[test]
    fn expand_to_square_centres_on_the_mean_colour() {
        let p = ImageProcessor::clip_default(4);
        assert_eq!(p.mean_colour(), [122, 116, 104]);
        let img = RgbImage::from_pixel(4, 1, image::Rgb([1, 2, 3]));
        let sq = expand_to_square(&img, p.mean_colour());
        assert_eq!(sq.dimensions(), (4, 4));
        assert_eq!(sq.get_pixel(0, 1).0, [1, 2, 3]);
        assert_eq!(sq.get_pixel(0, 0).0, [122, 116, 104]);
        assert_eq!(sq.get_pixel(0, 2).0, [122, 116, 104]);
    }
}
