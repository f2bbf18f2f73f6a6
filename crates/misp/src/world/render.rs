//! Scene graphs to RGB images: a noisy, tinted, gradient background and the objects drawn on
//! it with 2x2 supersampling, so that small and tiny objects keep their shape.
//!
//! Everything random here (background, jitter) comes from the scene's own stream, so an image
//! depends only on the seed, the scene id and the configuration.

use image::{ImageFormat, RgbImage};

use super::rng::Rng;
use super::scene::{Object, Scene, Shape, Size, Visibility};
use super::WorldConfig;

/// Draws `scene` as an `image_size` x `image_size` RGB image.
pub fn render(scene: &Scene, cfg: &WorldConfig, rng: &mut Rng) -> RgbImage {
    let n = cfg.image_size;
    let size = n as f64;
    let mut img = background(n, cfg.noise, rng);
    let cell = size / 3.0;
    let mut occluders = Vec::new();
    for obj in &scene.objects {
        let (row, col) = (f64::from(obj.cell / 3), f64::from(obj.cell % 3));
        let jitter = cell * 0.1;
        let cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter);
        let cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter);
        let r = cell
            * match (obj.visibility, obj.size) {
                (Visibility::Tiny, _) => 0.13,
                (_, Size::Small) => 0.27,
                (_, Size::Large) => 0.42,
            };
        let alpha = match obj.visibility {
            Visibility::Faint => cfg.faint_alpha,
            _ => 1.0,
        };
        // Each object's colour varies a little, so colour names cover a range, not one value.
        let rgb = obj.colour.rgb().map(|c| {
            let v = f64::from(c) + rng.uniform(-18.0, 18.0);
            v.clamp(0.0, 255.0)
        });
        draw(&mut img, obj, cx, cy, r, rgb, alpha);
        if obj.visibility == Visibility::Occluded {
            occluders.push((cx, cy, r));
        }
    }
    // Occluders go on top of everything: a patch of fresh texture over three quarters of the
    // object, from a random side, leaving an edge to be seen.
    for (cx, cy, r) in occluders {
        let side = rng.below(4);
        let (mut x0, mut x1, mut y0, mut y1) =
            (cx - r - 1.0, cx + r + 1.0, cy - r - 1.0, cy + r + 1.0);
        let cut = 0.5 * r;
        match side {
            0 => x0 += cut,
            1 => x1 -= cut,
            2 => y0 += cut,
            _ => y1 -= cut,
        }
        let base = [rng.uniform(40.0, 150.0); 3].map(|v| v + rng.uniform(-20.0, 20.0));
        for y in (y0.max(0.0) as u32)..(y1.min(size).ceil() as u32).min(n) {
            for x in (x0.max(0.0) as u32)..(x1.min(size).ceil() as u32).min(n) {
                let px = base.map(|v| (v + rng.uniform(-8.0, 8.0)).clamp(0.0, 255.0) as u8);
                img.put_pixel(x, y, image::Rgb(px));
            }
        }
    }
    img
}

/// PNG bytes of `img`.
pub fn png(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Muted (grey-ish, tinted) so the saturated object colours stay distinct, with a linear
/// gradient in a random direction and per-pixel noise of +-`noise`.
fn background(n: u32, noise: f64, rng: &mut Rng) -> RgbImage {
    let grey = rng.uniform(25.0, 130.0);
    let tint = [0; 3].map(|_: i32| grey + rng.uniform(-15.0, 15.0));
    let angle = rng.uniform(0.0, std::f64::consts::TAU);
    let strength = rng.uniform(0.0, 30.0);
    let (gx, gy) = (angle.cos() * strength, angle.sin() * strength);
    let size = f64::from(n);
    let mut img = RgbImage::new(n, n);
    for y in 0..n {
        for x in 0..n {
            let t = (f64::from(x) / size - 0.5) * gx + (f64::from(y) / size - 0.5) * gy;
            let px = tint.map(|c| (c + t + rng.uniform(-noise, noise)).clamp(0.0, 255.0) as u8);
            img.put_pixel(x, y, image::Rgb(px));
        }
    }
    img
}

/// Blends the object over the image with coverage from 2x2 samples per pixel.
fn draw(img: &mut RgbImage, obj: &Object, cx: f64, cy: f64, r: f64, rgb: [f64; 3], alpha: f64) {
    let n = img.width();
    let lo = |c: f64| (c - r - 1.0).floor().max(0.0) as u32;
    let hi = |c: f64| ((c + r + 1.0).ceil().max(0.0) as u32).min(n);
    let outline = polygon(obj.shape, r);
    for y in lo(cy)..hi(cy) {
        for x in lo(cx)..hi(cx) {
            let mut hits = 0;
            for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let dx = f64::from(x) + sx - cx;
                let dy = f64::from(y) + sy - cy;
                if inside(obj.shape, &outline, dx, dy, r) {
                    hits += 1;
                }
            }
            if hits == 0 {
                continue;
            }
            let a = alpha * f64::from(hits) / 4.0;
            let px = img.get_pixel_mut(x, y);
            for (p, c) in px.0.iter_mut().zip(rgb) {
                *p = (f64::from(*p) * (1.0 - a) + c * a).round() as u8;
            }
        }
    }
}

/// Vertices of the polygonal shapes (empty for the others), centred on the origin, y down.
fn polygon(shape: Shape, r: f64) -> Vec<(f64, f64)> {
    let around = |k: usize, radius: &dyn Fn(usize) -> f64, phase: f64| -> Vec<(f64, f64)> {
        (0..k)
            .map(|i| {
                let a = phase + std::f64::consts::TAU * i as f64 / k as f64;
                (radius(i) * a.cos(), radius(i) * a.sin())
            })
            .collect()
    };
    let up = -std::f64::consts::FRAC_PI_2;
    match shape {
        Shape::Triangle => around(3, &|_| r, up),
        Shape::Hexagon => around(6, &|_| r, 0.0),
        Shape::Star => around(10, &|i| if i % 2 == 0 { r } else { 0.42 * r }, up),
        _ => Vec::new(),
    }
}

fn inside(shape: Shape, outline: &[(f64, f64)], dx: f64, dy: f64, r: f64) -> bool {
    let d2 = dx * dx + dy * dy;
    match shape {
        Shape::Circle => d2 <= r * r,
        Shape::Ring => d2 <= r * r && d2 >= (0.55 * r) * (0.55 * r),
        Shape::Square => dx.abs() <= 0.8 * r && dy.abs() <= 0.8 * r,
        Shape::Diamond => dx.abs() + dy.abs() <= r,
        Shape::Cross => {
            (dx.abs() <= 0.3 * r && dy.abs() <= r) || (dy.abs() <= 0.3 * r && dx.abs() <= r)
        }
        Shape::Triangle | Shape::Hexagon | Shape::Star => in_polygon(outline, dx, dy),
    }
}

/// Even-odd rule (works for the concave star).
fn in_polygon(points: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = points.len().wrapping_sub(1);
    for i in 0..points.len() {
        let (xi, yi) = points[i];
        let (xj, yj) = points[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}
