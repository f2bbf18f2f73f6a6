//! PIL's resampling (`Image.resize` with `BICUBIC` / `BILINEAR`, 8 bits per channel)
//! re-implemented bit for bit, for the image processors of the models: transformers' PIL
//! backends resize with it, so equal pixels need equal arithmetic (fixed-point coefficients,
//! `u8` rounding between the two passes, and PIL's order of the passes).

use image::RgbImage;

/// Resampling filters of PIL that CLIP-family checkpoints use (`resample` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// PIL `BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// PIL `BICUBIC` (3): Keys cubic with `a = -0.5`, support 2. CLIP's choice.
    Bicubic,
}

impl Resample {
    /// A config's `resample` (PIL's filter number; absent means bicubic, the processors'
    /// default), or the reason it cannot be used.
    pub fn from_pil(code: Option<u32>) -> Result<Self, String> {
        match code {
            None | Some(3) => Ok(Resample::Bicubic),
            Some(2) => Ok(Resample::Bilinear),
            Some(r) => Err(format!(
                "PIL filter {r} is not supported (2 bilinear and 3 bicubic are)"
            )),
        }
    }
}

/// A per-channel config value (`image_mean`, `image_std`): three values, or one for all three
/// channels; absent means `default`.
pub fn channel_values(v: Option<Vec<f32>>, default: [f32; 3]) -> Result<[f32; 3], String> {
    match v {
        None => Ok(default),
        Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
        Some(v) if v.len() == 1 => Ok([v[0]; 3]),
        Some(v) => Err(format!("expected 3 values, got {}", v.len())),
    }
}

/// PIL's `Image.resize(size, filter)` for 8-bit RGB: separable, horizontal pass first (vertical
/// first when the width grows and the height shrinks, as PIL), each pass rounded to `u8` (PIL
/// `ImagingResample`, 8 bits per channel path).
pub fn resize(img: &RgbImage, out_w: u32, out_h: u32, filter: Resample) -> RgbImage {
    if img.dimensions() == (out_w, out_h) {
        return img.clone();
    }
    let (w, h) = (out_w as usize, out_h as usize);
    let data = resize_window(img, (out_w, out_h), filter, (0..h, 0..w));
    RgbImage::from_raw(out_w, out_h, data).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

/// The window `rows x cols` of [`resize`]'s output, row-major RGB, computing only those pixels:
/// each output pixel depends on its own row and column taps alone, so the window is exactly
/// the same bytes as cropping the whole resized image (a centre crop of a 4:3 photo throws
/// away a quarter of it). Inner loops accumulate in `i32` over whole rows, so they vectorise.
pub(crate) fn resize_window(
    img: &RgbImage,
    (out_w, out_h): (u32, u32),
    filter: Resample,
    (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let (win_w, win_h) = (cols.len(), rows.len());
    if win_w == 0 || win_h == 0 {
        return Vec::new();
    }
    // PIL (Pillow 13.0.0 measured) runs the vertical pass first when the width grows and the
    // height shrinks: its output then equals a vertical-only resize followed by a
    // horizontal-only one bit for bit, and differs from the other order by up to a few levels
    // (a 27 x 200 image to 28 x 196). Every other case is horizontal first.
    if out_w as usize > in_w && (out_h as usize) < in_h {
        let tall = resize_window(img, (in_w as u32, out_h), filter, (rows, 0..in_w));
        let tall = RgbImage::from_raw(in_w as u32, win_h as u32, tall)
            .expect("a window of in_w x rows pixels");
        return resize_window(&tall, (out_w, win_h as u32), filter, (0..win_h, cols));
    }
    // Horizontal pass (or the source columns as they are), over the source rows the vertical
    // pass reads: `stage` is `stage_rows x win_w` pixels starting at source row `row0`.
    let vert = (out_h as usize != in_h).then(|| Coeffs::new(in_h, out_h as usize, filter));
    let (row0, stage_rows) = match &vert {
        Some(v) => {
            let first = v.bounds[rows.start].0;
            let (lmin, ln) = v.bounds[rows.end - 1];
            (first, lmin + ln - first)
        }
        None => (rows.start, win_h),
    };
    let mut stage = vec![0u8; stage_rows * win_w * 3];
    if out_w as usize != in_w {
        let horiz = Coeffs::new(in_w, out_w as usize, filter);
        crate::kernels::vectorised(
            #[inline(always)]
            || {
                for (y, out) in stage.chunks_exact_mut(win_w * 3).enumerate() {
                    let line = &src[(row0 + y) * in_w * 3..][..in_w * 3];
                    for (xx, px) in cols.clone().zip(out.chunks_exact_mut(3)) {
                        let (xmin, n) = horiz.bounds[xx];
                        let k = &horiz.k[xx * horiz.ksize..][..n];
                        let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                        for (&kv, p) in k.iter().zip(line[xmin * 3..].chunks_exact(3)) {
                            for (s, &v) in ss.iter_mut().zip(p) {
                                *s += i32::from(v) * kv;
                            }
                        }
                        for (o, s) in px.iter_mut().zip(ss) {
                            *o = clip8(s);
                        }
                    }
                }
            },
        );
    } else {
        for (y, out) in stage.chunks_exact_mut(win_w * 3).enumerate() {
            out.copy_from_slice(&src[((row0 + y) * in_w + cols.start) * 3..][..win_w * 3]);
        }
    }
    let Some(vert) = vert else {
        return stage;
    };
    let row_len = win_w * 3;
    let mut out = vec![0u8; win_h * row_len];
    crate::kernels::vectorised(
        #[inline(always)]
        || {
            let mut acc = vec![0i32; row_len];
            for (yy, out) in rows.clone().zip(out.chunks_exact_mut(row_len)) {
                let (ymin, n) = vert.bounds[yy];
                acc.fill(1i32 << (PRECISION_BITS - 1));
                for (i, &kv) in vert.k[yy * vert.ksize..][..n].iter().enumerate() {
                    let line = &stage[(ymin - row0 + i) * row_len..][..row_len];
                    for (a, &v) in acc.iter_mut().zip(line) {
                        *a += i32::from(v) * kv;
                    }
                }
                for (o, &a) in out.iter_mut().zip(&acc) {
                    *o = clip8(a);
                }
            }
        },
    );
    out
}

/// Fixed-point precision of PIL's 8-bit resampler: `32 - 8 - 2` bits.
const PRECISION_BITS: u32 = 22;

fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel the first
/// source index and tap count, and `ksize` fixed-point taps.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Self {
        let (support, f): (f64, fn(f64) -> f64) = match filter {
            Resample::Bicubic => (2.0, bicubic),
            Resample::Bilinear => (1.0, bilinear),
        };
        let scale = in_size as f64 / out_size as f64;
        // Downscaling widens the filter by the scale: PIL's antialiasing.
        let filterscale = scale.max(1.0);
        let support = support * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's `(int)` truncates toward zero, as Rust's `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = f((x as f64 + xmin as f64 - center + 0.5) * ss);
                ww += *wx;
            }
            for x in 0..n {
                let v = if ww != 0.0 { w[x] / ww } else { w[x] };
                let fixed = v * f64::from(1u32 << PRECISION_BITS);
                k[xx * ksize + x] = if v < 0.0 {
                    (-0.5 + fixed) as i32
                } else {
                    (0.5 + fixed) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Self { ksize, bounds, k }
    }
}

/// PIL's `bicubic_filter` (Keys, `a = -0.5`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `bilinear_filter`.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}
