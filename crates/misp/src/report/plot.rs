//! PNG charts for reports: grouped bar charts (metrics of several runs) and line charts
//! (curves over steps), drawn pixel by pixel on an RGB canvas with a 5x7 bitmap font.
//!
//! Deliberately small: axes from zero (or the data's minimum when negative) to a "nice" upper
//! bound, five ticks, a legend, a title. Files are written atomically (temp file + rename).

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::files::{write_atomic, FileError};

/// Chart size when none is given, in pixels.
pub const DEFAULT_SIZE: (u32, u32) = (960, 540);

/// Why a chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{0}")]
    Input(String),
    #[error("{path}: PNG encoding failed: {message}", path = .path.display())]
    Encode {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Series colours (colour-blind-friendly, after Okabe and Ito), cycled.
const PALETTE: [Rgb<u8>; 8] = [
    Rgb([0, 114, 178]),
    Rgb([230, 159, 0]),
    Rgb([0, 158, 115]),
    Rgb([204, 121, 167]),
    Rgb([86, 180, 233]),
    Rgb([213, 94, 0]),
    Rgb([240, 228, 66]),
    Rgb([0, 0, 0]),
];

/// Background colour of every chart (what tests compare pixels against).
pub const BACKGROUND: Rgb<u8> = WHITE;

/// The colour of series `i`.
pub fn series_color(i: usize) -> Rgb<u8> {
    PALETTE[i % PALETTE.len()]
}

/// 5x7 glyphs for ASCII 32..=126; each row's low 5 bits, most significant = leftmost pixel.
#[rustfmt::skip]
const FONT: [[u8; 7]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04], // '!'
    [0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00], // '"'
    [0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a], // '#'
    [0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04], // '$'
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03], // '%'
    [0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d], // '&'
    [0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00], // "'"
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02], // '('
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08], // ')'
    [0x00, 0x04, 0x15, 0x0e, 0x15, 0x04, 0x00], // '*'
    [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00], // '+'
    [0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08], // ','
    [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00], // '-'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c], // '.'
    [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00], // '/'
    [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e], // '0'
    [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e], // '1'
    [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f], // '2'
    [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e], // '3'
    [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02], // '4'
    [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e], // '5'
    [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e], // '6'
    [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08], // '7'
    [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e], // '8'
    [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c], // '9'
    [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00], // ':'
    [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x04, 0x08], // ';'
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02], // '<'
    [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00], // '='
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08], // '>'
    [0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04], // '?'
    [0x0e, 0x11, 0x01, 0x0d, 0x15, 0x15, 0x0e], // '@'
    [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11], // 'A'
    [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e], // 'B'
    [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e], // 'C'
    [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c], // 'D'
    [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f], // 'E'
    [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10], // 'F'
    [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f], // 'G'
    [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11], // 'H'
    [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e], // 'I'
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c], // 'J'
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11], // 'K'
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f], // 'L'
    [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11], // 'M'
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11], // 'N'
    [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e], // 'O'
    [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10], // 'P'
    [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d], // 'Q'
    [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11], // 'R'
    [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e], // 'S'
    [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // 'T'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e], // 'U'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04], // 'V'
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a], // 'W'
    [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11], // 'X'
    [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04], // 'Y'
    [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f], // 'Z'
    [0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e], // '['
    [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00], // '\\'
    [0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e], // ']'
    [0x04, 0x0a, 0x11, 0x00, 0x00, 0x00, 0x00], // '^'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f], // '_'
    [0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00], // '`'
    [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f], // 'a'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e], // 'b'
    [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e], // 'c'
    [0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f], // 'd'
    [0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e], // 'e'
    [0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08], // 'f'
    [0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e], // 'g'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11], // 'h'
    [0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e], // 'i'
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c], // 'j'
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12], // 'k'
    [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e], // 'l'
    [0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11], // 'm'
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11], // 'n'
    [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e], // 'o'
    [0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10], // 'p'
    [0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01], // 'q'
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10], // 'r'
    [0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e], // 's'
    [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06], // 't'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d], // 'u'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04], // 'v'
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a], // 'w'
    [0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11], // 'x'
    [0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e], // 'y'
    [0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f], // 'z'
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02], // '{'
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // '|'
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08], // '}'
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00], // '~'
];

/// Glyph cell: 5 pixels wide plus 1 of spacing, 7 tall plus 2 of line spacing (at scale 1).
const CELL_W: u32 = 6;
const CELL_H: u32 = 9;

/// A pixel rectangle: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(w, h, BACKGROUND),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    fn fill(&mut self, r: Rect, c: Rgb<u8>) {
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                self.put(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham with a square brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), width: i64, c: Rgb<u8>) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = width / 2;
        loop {
            self.fill(
                Rect {
                    x: x - half,
                    y: y - half,
                    w: width,
                    h: width,
                },
                c,
            );
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`; characters outside the font show
    /// as `?`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb<u8>) {
        for (i, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            let gx = x + i as i64 * CELL_W as i64 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let r = Rect {
                            x: gx + col * scale,
                            y: y + row as i64 * scale,
                            w: scale,
                            h: scale,
                        };
                        self.fill(r, c);
                    }
                }
            }
        }
    }

    /// Draws `text` rotated a quarter turn anticlockwise (reading bottom to top), its
    /// bounding box's top-left at `(x, y)`.
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb<u8>) {
        let len = text.chars().count() as i64 * CELL_W as i64 * scale;
        for (i, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        // Unrotated (u, v) -> rotated (v, len - u).
                        let u = i as i64 * CELL_W as i64 * scale + col * scale;
                        let v = row as i64 * scale;
                        self.fill(
                            Rect {
                                x: x + v,
                                y: y + len - u - scale,
                                w: scale,
                                h: scale,
                            },
                            c,
                        );
                    }
                }
            }
        }
    }
}

fn glyph(ch: char) -> [u8; 7] {
    let code = ch as u32;
    if (32..=126).contains(&code) {
        FONT[(code - 32) as usize]
    } else {
        FONT[('?' as u32 - 32) as usize]
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * CELL_W).saturating_sub(1) * scale
}

/// `text` cut (with `..`) to fit `max_px` pixels at `scale`.
fn fit(text: &str, max_px: u32, scale: u32) -> String {
    if text_width(text, scale) <= max_px {
        return text.to_string();
    }
    let keep = (max_px / (CELL_W * scale)).saturating_sub(2) as usize;
    let mut s: String = text.chars().take(keep).collect();
    s.push_str("..");
    s
}

/// A "nice" axis range containing `[lo, hi]` with about five ticks: `(min, max, step)`.
pub fn nice_range(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// A tick label with as many decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().clamp(0.0, 6.0) as usize + 1
    };
    let s = format!("{v:.decimals$}");
    if decimals > 0 && s.contains('.') {
        let t = s.trim_end_matches('0').trim_end_matches('.');
        if t == "-0" {
            "0".into()
        } else {
            t.to_string()
        }
    } else {
        s
    }
}

/// Plot area and the axis mapping shared by both chart kinds.
struct Frame {
    area: Rect,
    y_min: f64,
    y_max: f64,
}

impl Frame {
    fn y_px(&self, v: f64) -> i64 {
        let t = (v - self.y_min) / (self.y_max - self.y_min);
        self.area.y + self.area.h - (t * self.area.h as f64).round() as i64
    }
}

/// Title, y axis with ticks and grid, y label; returns the frame. `bottom` is the pixels kept
/// below the plot area for x labels.
fn draw_frame(cv: &mut Canvas, title: &str, y_label: &str, lo: f64, hi: f64, bottom: i64) -> Frame {
    let (w, h) = (cv.img.width() as i64, cv.img.height() as i64);
    let (y_min, y_max, step) = nice_range(lo, hi);
    let ticks: Vec<f64> = (0..=((y_max - y_min) / step).round() as i64)
        .map(|i| y_min + i as f64 * step)
        .collect();
    let label_w = ticks
        .iter()
        .map(|t| text_width(&tick_label(*t, step), 1))
        .max()
        .unwrap_or(0) as i64;
    let left = 12 + CELL_H as i64 + 8 + label_w + 8;
    let top = 12 + 2 * CELL_H as i64 + 10;
    let area = Rect {
        x: left,
        y: top,
        w: (w - left - 16).max(10),
        h: (h - top - bottom).max(10),
    };
    let frame = Frame { area, y_min, y_max };
    let title = fit(title, (w - 24) as u32, 2);
    cv.text((w - text_width(&title, 2) as i64) / 2, 12, &title, 2, INK);
    for t in &ticks {
        let y = frame.y_px(*t);
        cv.line((area.x, y), (area.x + area.w, y), 1, GRID);
        cv.line((area.x - 4, y), (area.x, y), 1, INK);
        let label = tick_label(*t, step);
        cv.text(
            area.x - 6 - text_width(&label, 1) as i64,
            y - 3,
            &label,
            1,
            INK,
        );
    }
    let y_label = fit(y_label, area.h as u32, 1);
    let ly = area.y + (area.h - text_width(&y_label, 1) as i64) / 2;
    cv.text_up(12, ly, &y_label, 1, INK);
    cv.line((area.x, area.y), (area.x, area.y + area.h), 1, INK);
    frame
}

/// A legend box in the top-right corner of the plot area.
fn draw_legend(cv: &mut Canvas, area: Rect, names: &[&str]) {
    if names.is_empty() {
        return;
    }
    let text_w = names.iter().map(|n| text_width(n, 1)).max().unwrap_or(0) as i64;
    let (row_h, pad) = (CELL_H as i64 + 4, 6);
    let w = pad * 2 + 12 + 6 + text_w;
    let h = pad * 2 + row_h * names.len() as i64 - 4;
    let r = Rect {
        x: area.x + area.w - w - 6,
        y: area.y + 6,
        w,
        h,
    };
    cv.fill(r, WHITE);
    for (a, b) in [
        ((r.x, r.y), (r.x + r.w, r.y)),
        ((r.x, r.y + r.h), (r.x + r.w, r.y + r.h)),
        ((r.x, r.y), (r.x, r.y + r.h)),
        ((r.x + r.w, r.y), (r.x + r.w, r.y + r.h)),
    ] {
        cv.line(a, b, 1, GRID);
    }
    for (i, name) in names.iter().enumerate() {
        let y = r.y + pad + i as i64 * row_h;
        cv.fill(
            Rect {
                x: r.x + pad,
                y,
                w: 12,
                h: 8,
            },
            series_color(i),
        );
        cv.text(r.x + pad + 18, y, name, 1, INK);
    }
}

fn encode(path: &Path, img: &RgbImage) -> Result<(), PlotError> {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| PlotError::Encode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &bytes)?;
    Ok(())
}

fn check_finite(values: impl IntoIterator<Item = f64>, what: &str) -> Result<(), PlotError> {
    match values.into_iter().find(|v| !v.is_finite()) {
        Some(v) => Err(PlotError::Input(format!("{what}: value {v} is not finite"))),
        None => Ok(()),
    }
}

/// Renders a grouped bar chart: one cluster per group, one bar per series in each (series `s`
/// has one value per group; NaN means "no value" and draws no bar, so runs that lack a metric
/// can share a chart). Returns the image and every bar's rectangle, series-major (empty for
/// NaN).
pub fn render_bar_chart(
    size: (u32, u32),
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(RgbImage, Vec<Vec<Rect>>), PlotError> {
    if groups.is_empty() || series.is_empty() {
        return Err(PlotError::Input("bar chart: no groups or no series".into()));
    }
    for (name, values) in series {
        if values.len() != groups.len() {
            return Err(PlotError::Input(format!(
                "bar chart: series {name:?} has {} values for {} groups",
                values.len(),
                groups.len()
            )));
        }
        let present = values.iter().copied().filter(|v| !v.is_nan());
        check_finite(present, &format!("bar chart series {name:?}"))?;
    }
    let all = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| !v.is_nan());
    let lo = all.clone().fold(0.0f64, f64::min);
    let hi = all.fold(0.0f64, f64::max);
    let mut cv = Canvas::new(size.0.max(120), size.1.max(100));
    let frame = draw_frame(&mut cv, title, y_label, lo, hi, 12 + 2 * CELL_H as i64 + 14);
    let area = frame.area;
    let group_w = area.w as f64 / groups.len() as f64;
    let bar_w = ((group_w * 0.8) / series.len() as f64).max(1.0);
    let mut rects = vec![Vec::new(); series.len()];
    let base = frame.y_px(0.0f64.clamp(frame.y_min, frame.y_max));
    for (g, group) in groups.iter().enumerate() {
        let gx = area.x as f64 + g as f64 * group_w + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let x = (gx + s as f64 * bar_w).round() as i64;
            let x_end = (gx + (s + 1) as f64 * bar_w).round() as i64 - i64::from(bar_w >= 4.0);
            if values[g].is_nan() {
                rects[s].push(Rect {
                    x,
                    y: base,
                    w: 0,
                    h: 0,
                });
                continue;
            }
            let y = frame.y_px(values[g]);
            let r = Rect {
                x,
                y: y.min(base),
                w: (x_end - x).max(1),
                h: (y - base).abs().max(1),
            };
            cv.fill(r, series_color(s));
            rects[s].push(r);
        }
        // A label too wide for its group breaks at its first space onto a second line.
        let lines: Vec<&str> = match group.split_once(' ') {
            Some((a, b)) if text_width(group, 1) > group_w as u32 => vec![a, b],
            _ => vec![group.as_str()],
        };
        for (k, line) in lines.iter().enumerate() {
            let label = fit(line, group_w as u32, 1);
            let lx = area.x
                + (g as f64 * group_w + (group_w - text_width(&label, 1) as f64) / 2.0) as i64;
            cv.text(
                lx,
                area.y + area.h + 8 + k as i64 * CELL_H as i64,
                &label,
                1,
                INK,
            );
        }
    }
    cv.line((area.x, base), (area.x + area.w, base), 1, INK);
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    draw_legend(&mut cv, area, &names);
    Ok((cv.img, rects))
}

/// Writes a grouped bar chart PNG of [`DEFAULT_SIZE`] to `path` (see [`render_bar_chart`]).
pub fn bar_chart(
    path: &Path,
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(), PlotError> {
    bar_chart_sized(path, DEFAULT_SIZE, title, groups, series, y_label)
}

/// [`bar_chart`] at a given size in pixels (wide charts for many groups).
pub fn bar_chart_sized(
    path: &Path,
    size: (u32, u32),
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(), PlotError> {
    let (img, _) = render_bar_chart(size, title, groups, series, y_label)?;
    encode(path, &img)
}

/// Renders a line chart: each series a polyline through its `(x, y)` points (in the given
/// order) with a square marker on every point.
pub fn render_line_chart(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<RgbImage, PlotError> {
    render_points(size, title, series, &[], x_label, y_label, true)
}

/// A scatter plot: the points of each series as dots, not joined (t-SNE maps).
pub fn scatter_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let img = render_points(DEFAULT_SIZE, title, series, &[], x_label, y_label, false)?;
    encode(path, &img)
}

/// Renders a line chart whose points carry intervals: `intervals[s][i]` is the `(lo, hi)` of
/// point `i` of series `s`, drawn as a vertical whisker with caps (a sweep's 95% intervals).
pub fn render_interval_chart(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
) -> Result<RgbImage, PlotError> {
    if intervals.len() != series.len()
        || series
            .iter()
            .zip(intervals)
            .any(|((_, p), iv)| p.len() != iv.len())
    {
        return Err(PlotError::Input(
            "interval chart: one (lo, hi) per point of every series".into(),
        ));
    }
    render_points(size, title, series, intervals, x_label, y_label, true)
}

/// Writes an interval chart PNG of [`DEFAULT_SIZE`] to `path` (see [`render_interval_chart`]).
pub fn interval_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let img = render_interval_chart(DEFAULT_SIZE, title, series, intervals, x_label, y_label)?;
    encode(path, &img)
}

/// Points of each series on shared axes, joined by lines when `connect`, with whiskers where
/// `intervals` (empty, or one `(lo, hi)` per point) gives them.
fn render_points(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
    connect: bool,
) -> Result<RgbImage, PlotError> {
    let mut points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if points.is_empty() {
        return Err(PlotError::Input("line chart: no points".into()));
    }
    // The y range holds the whiskers too.
    for (iv, (_, pts)) in intervals.iter().zip(series) {
        for ((lo, hi), (x, _)) in iv.iter().zip(pts) {
            points.extend([(*x, *lo), (*x, *hi)]);
        }
    }
    check_finite(points.iter().flat_map(|(x, y)| [*x, *y]), "line chart")?;
    let (x_lo, x_hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y_lo, y_hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    // Losses and metrics read best against a zero baseline when they are all positive and
    // not far from it; curves far from zero keep their own range.
    let y_lo = if y_lo > 0.0 && y_lo < 0.5 * y_hi {
        0.0
    } else {
        y_lo
    };
    let mut cv = Canvas::new(size.0.max(120), size.1.max(100));
    let frame = draw_frame(
        &mut cv,
        title,
        y_label,
        y_lo,
        y_hi,
        12 + 2 * CELL_H as i64 + 18,
    );
    let area = frame.area;
    let (x_min, x_max, x_step) = nice_range(x_lo, x_hi);
    let x_px = |v: f64| area.x + ((v - x_min) / (x_max - x_min) * area.w as f64).round() as i64;
    let mut t = x_min;
    while t <= x_max + x_step * 1e-9 {
        let x = x_px(t);
        cv.line((x, area.y + area.h), (x, area.y + area.h + 4), 1, INK);
        let label = tick_label(t, x_step);
        cv.text(
            x - text_width(&label, 1) as i64 / 2,
            area.y + area.h + 8,
            &label,
            1,
            INK,
        );
        t += x_step;
    }
    cv.line(
        (area.x, area.y + area.h),
        (area.x + area.w, area.y + area.h),
        1,
        INK,
    );
    let x_label = fit(x_label, area.w as u32, 1);
    cv.text(
        area.x + (area.w - text_width(&x_label, 1) as i64) / 2,
        area.y + area.h + 10 + CELL_H as i64,
        &x_label,
        1,
        INK,
    );
    for (s, (_, pts)) in series.iter().enumerate() {
        let px: Vec<(i64, i64)> = pts
            .iter()
            .map(|(x, y)| (x_px(*x), frame.y_px(*y)))
            .collect();
        if connect {
            for pair in px.windows(2) {
                cv.line(pair[0], pair[1], 2, series_color(s));
            }
        }
        for (p, (lo, hi)) in px.iter().zip(intervals.get(s).into_iter().flatten()) {
            let (top, bottom) = (frame.y_px(*hi), frame.y_px(*lo));
            cv.line((p.0, top), (p.0, bottom), 1, series_color(s));
            for y in [top, bottom] {
                cv.line((p.0 - 5, y), (p.0 + 5, y), 1, series_color(s));
            }
        }
        for p in &px {
            cv.fill(
                Rect {
                    x: p.0 - 2,
                    y: p.1 - 2,
                    w: 5,
                    h: 5,
                },
                series_color(s),
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    draw_legend(&mut cv, area, &names);
    Ok(cv.img)
}

/// Writes a line chart PNG of [`DEFAULT_SIZE`] to `path` (see [`render_line_chart`]).
pub fn line_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let img = render_line_chart(DEFAULT_SIZE, title, series, x_label, y_label)?;
    encode(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("misp-plot-{}-{name}", std::process::id()))
    }

    #[test]
    fn bar_chart_decodes_with_bars_where_they_should_be() {
        let path = tmp("bars.png");
        let groups: Vec<String> = ["accuracy", "f1", "yes ratio"].map(String::from).to_vec();
        let series = vec![
            ("base".to_string(), vec![0.8, 0.75, 0.6]),
            ("misp-dpo".to_string(), vec![0.9, 0.88, 0.5]),
        ];
        bar_chart(&path, "POPE overall", &groups, &series, "fraction").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), DEFAULT_SIZE);
        let (rendered, rects) =
            render_bar_chart(DEFAULT_SIZE, "POPE overall", &groups, &series, "fraction").unwrap();
        assert_eq!(
            rendered.as_raw(),
            img.as_raw(),
            "the file holds what was rendered"
        );
        for (s, bars) in rects.iter().enumerate() {
            for (g, r) in bars.iter().enumerate() {
                let centre = img.get_pixel((r.x + r.w / 2) as u32, (r.y + r.h / 2) as u32);
                assert_eq!(*centre, series_color(s), "bar {s}/{g} at {r:?}");
            }
        }
        // Taller value, taller bar.
        assert!(rects[1][0].h > rects[0][0].h);
        // Above the tallest bar of a group, near the plot top, is background or grid.
        let r = rects[1][0];
        assert_ne!(
            *img.get_pixel((r.x + r.w / 2) as u32, (r.y - 30) as u32),
            series_color(1)
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn line_chart_draws_its_series() {
        let path = tmp("lines.png");
        let series = vec![(
            "loss".to_string(),
            vec![(0.0, 1.0), (10.0, 0.5), (20.0, 0.25)],
        )];
        line_chart(&path, "Training", &series, "step", "loss").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), DEFAULT_SIZE);
        let colored = img.pixels().filter(|p| **p == series_color(0)).count();
        assert!(colored > 500, "only {colored} series pixels");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_input_is_an_error() {
        let groups = vec!["a".to_string()];
        let err = render_bar_chart(
            (200, 100),
            "t",
            &groups,
            &[("s".into(), vec![1.0, 2.0])],
            "y",
        )
        .unwrap_err();
        assert!(err.to_string().contains("2 values for 1 groups"), "{err}");
        let err = render_bar_chart(
            (200, 100),
            "t",
            &groups,
            &[("s".into(), vec![f64::INFINITY])],
            "y",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not finite"), "{err}");
    }

    #[test]
    fn nice_ranges_and_labels() {
        assert_eq!(nice_range(0.0, 0.93), (0.0, 1.0, 0.2));
        assert_eq!(nice_range(0.0, 87.0), (0.0, 100.0, 20.0));
        assert_eq!(tick_label(0.6000000000000001, 0.2), "0.6");
        assert_eq!(tick_label(40.0, 20.0), "40");
        assert_eq!(text_width("ab", 1), 11);
    }

    #[test]
    fn interval_chart_draws_whiskers_at_the_interval_ends() {
        let series = vec![("misp".to_string(), vec![(0.1, 50.0), (1.0, 60.0)])];
        let intervals = vec![vec![(40.0, 55.0), (58.0, 62.0)]];
        let img = render_interval_chart(DEFAULT_SIZE, "sweep", &series, &intervals, "beta", "F1")
            .unwrap();
        // The first point's whisker reaches far below its marker: somewhere on its column,
        // well below the marker, pixels have the series colour.
        let plain = render_line_chart(DEFAULT_SIZE, "sweep", &series, "beta", "F1").unwrap();
        let colour = series_color(0);
        let count = |im: &RgbImage| im.pixels().filter(|p| **p == colour).count();
        assert!(
            count(&img) > count(&plain) + 20,
            "whiskers add coloured pixels"
        );
        // Mismatched shapes are an error, not a panic.
        assert!(render_interval_chart(DEFAULT_SIZE, "x", &series, &[vec![]], "a", "b").is_err());
    }
}
