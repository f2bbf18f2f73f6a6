//! PNG charts for reports, drawn with `plotters` (bitmap backend, text rasterised by `ab_glyph`
//! from DejaVu Sans shipped in the crate, so a chart renders the same on every machine):
//! grouped bars with optional 95% interval whiskers, lines or points, and lines with interval
//! bands (the paper's sweeps).
//!
//! The value axis is fitted to the data and its intervals (with a margin), not to 0-1: on a 0-1
//! axis a 3-point difference between two variants is invisible. It starts at 0 only when the
//! data come close to 0 anyway. Files are written atomically (temp file + rename).
//!
//! Each `render_*` function returns the image and where it drew the data (pixel positions of
//! bars, whisker ends, points), so tests can check that the pixels say what the numbers say.

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use image::{ImageFormat, Rgb, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::files::{write_atomic, FileError};

/// Chart size when none is given, in pixels.
pub const DEFAULT_SIZE: (u32, u32) = (960, 540);

/// DejaVu Sans cut to ASCII and a few symbols (`assets/fonts/make_subset.py`; licence beside it).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-charts.ttf");
const FAMILY: &str = "misp-sans";

/// Why a chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{0}")]
    Input(String),
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("{path}: PNG encoding failed: {message}", path = .path.display())]
    Encode {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

const INK: RGBColor = RGBColor(40, 40, 40);
/// Series colours (colour-blind-friendly, after Okabe and Ito), cycled.
const PALETTE: [(u8, u8, u8); 8] = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
];

/// Background colour of every chart (what tests compare pixels against).
pub const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

/// The colour of series `i`.
pub fn series_color(i: usize) -> Rgb<u8> {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    Rgb([r, g, b])
}

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Whisker and interval-edge colour: darker than any bar, so a whisker shows on its own bar.
pub const WHISKER: Rgb<u8> = Rgb([40, 40, 40]);

fn font(size: u32) -> TextStyle<'static> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    (FAMILY, size).into_font().color(&INK)
}

/// A "nice" range and tick step covering `lo..=hi` (steps of 1, 2 or 5 times a power of ten,
/// about five ticks).
pub fn nice_range(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// The value axis for `values`: their span (at least 5% of their size) plus a 15% margin each
/// side, snapped to nice ticks;
/// from 0 when all are non-negative and the lowest is within a span of 0 (so that bars of small
/// positive values are not cut to slivers), never below 0 for non-negative data.
pub fn value_axis(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // At least 5% of the values' size: equal values must not be blown up into a "difference"
    // in the fourth decimal.
    let size = lo.abs().max(hi.abs());
    let span = (hi - lo).max(0.05 * size);
    let span = if span > 0.0 { span } else { 1.0 };
    let mut a = lo - 0.15 * span;
    let b = hi + 0.15 * span;
    if lo >= 0.0 && (a < 0.0 || lo <= span) {
        a = 0.0;
    }
    let (a, b, _) = nice_range(a, b);
    (if lo >= 0.0 { a.max(0.0) } else { a }, b)
}

fn check_finite(values: impl IntoIterator<Item = f64>, what: &str) -> Result<(), PlotError> {
    match values.into_iter().find(|v| !v.is_finite()) {
        Some(v) => Err(PlotError::Input(format!("{what}: value {v} is not finite"))),
        None => Ok(()),
    }
}

fn encode(path: &Path, img: &RgbImage) -> Result<(), PlotError> {
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| PlotError::Encode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, bytes.get_ref())?;
    Ok(())
}

/// Draws on a white `size` bitmap and returns it as an image.
fn render<T>(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<T, PlotError>,
) -> Result<(RgbImage, T), PlotError> {
    let (w, h) = (size.0.max(160), size.1.max(120));
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let out = {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let out = draw(&root)?;
        root.present().map_err(draw_err)?;
        out
    };
    let img = RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| PlotError::Draw("bitmap of the wrong size".into()))?;
    Ok((img, out))
}

/// Where one bar was drawn, in pixels: `x0..x1` wide, from `y_top` down to `y_base`; its
/// whisker, when it has an interval, spans `whisker = (y_hi, y_lo)` at the bar's centre.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BarPixels {
    pub x0: i32,
    pub x1: i32,
    pub y_top: i32,
    pub y_base: i32,
    pub whisker: Option<(i32, i32)>,
}

/// One panel of bars: `groups` along x, one bar per series in each group, optional intervals
/// `(lo, hi)` per value (NaN value: no bar).
struct Bars<'a> {
    title: &'a str,
    groups: &'a [String],
    series: &'a [(String, Vec<f64>)],
    intervals: Option<&'a [Vec<(f64, f64)>]>,
    y_label: &'a str,
    legend: bool,
}

impl Bars<'_> {
    fn check(&self) -> Result<(), PlotError> {
        if self.groups.is_empty() || self.series.is_empty() {
            return Err(PlotError::Input("bar chart: no groups or no series".into()));
        }
        for (s, (name, values)) in self.series.iter().enumerate() {
            if values.len() != self.groups.len() {
                return Err(PlotError::Input(format!(
                    "bar chart: series {name:?} has {} values for {} groups",
                    values.len(),
                    self.groups.len()
                )));
            }
            let present = values.iter().copied().filter(|v| !v.is_nan());
            check_finite(present, &format!("bar chart series {name:?}"))?;
            if let Some(iv) = self.intervals {
                let Some(iv) = iv.get(s).filter(|iv| iv.len() == values.len()) else {
                    return Err(PlotError::Input(format!(
                        "bar chart: series {name:?} needs one (lo, hi) per value"
                    )));
                };
                let ends = iv
                    .iter()
                    .flat_map(|(a, b)| [*a, *b])
                    .filter(|v| !v.is_nan());
                check_finite(ends, &format!("bar chart intervals of {name:?}"))?;
            }
        }
        Ok(())
    }

    fn draw(
        &self,
        area: &DrawingArea<BitMapBackend, Shift>,
    ) -> Result<Vec<Vec<BarPixels>>, PlotError> {
        let mut all: Vec<f64> = self.series.iter().flat_map(|(_, v)| v.clone()).collect();
        for iv in self.intervals.into_iter().flatten() {
            all.extend(iv.iter().flat_map(|(a, b)| [*a, *b]));
        }
        let (y0, y1) = value_axis(all);
        let n = self.groups.len() as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(self.title, font(20))
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_labels(7)
            .max_light_lines(1)
            .y_desc(self.y_label)
            .label_style(font(14))
            .axis_desc_style(font(15))
            .draw()
            .map_err(draw_err)?;
        let k = self.series.len() as f64;
        let width = 0.8 / k;
        let mut pixels = vec![Vec::new(); self.series.len()];
        for (s, (name, values)) in self.series.iter().enumerate() {
            let c = colour(s);
            let mut rects = Vec::new();
            for (g, v) in values.iter().enumerate() {
                let x0 = g as f64 + 0.1 + s as f64 * width;
                let x1 = x0 + width * 0.92;
                if v.is_nan() {
                    let p = chart.backend_coord(&(x0, y0));
                    pixels[s].push(BarPixels {
                        x0: p.0,
                        x1: p.0,
                        y_top: p.1,
                        y_base: p.1,
                        whisker: None,
                    });
                    continue;
                }
                let top = v.clamp(y0, y1);
                rects.push(Rectangle::new([(x0, y0), (x1, top)], c.filled()));
                let (a, b) = (
                    chart.backend_coord(&(x0, top)),
                    chart.backend_coord(&(x1, y0)),
                );
                pixels[s].push(BarPixels {
                    x0: a.0,
                    x1: b.0,
                    y_top: a.1,
                    y_base: b.1,
                    whisker: None,
                });
            }
            let drawn = chart.draw_series(rects).map_err(draw_err)?;
            if self.legend {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], c.filled())
                });
            }
            if let Some(iv) = self.intervals {
                let mut whiskers = Vec::new();
                for (g, &(lo, hi)) in iv[s].iter().enumerate() {
                    if lo.is_nan() || hi.is_nan() || values[g].is_nan() {
                        continue;
                    }
                    let xc = g as f64 + 0.1 + (s as f64 + 0.46) * width;
                    let cap = width * 0.25;
                    let style = ShapeStyle::from(&INK).stroke_width(2);
                    whiskers.push(PathElement::new(vec![(xc, lo), (xc, hi)], style));
                    for y in [lo, hi] {
                        whiskers.push(PathElement::new(vec![(xc - cap, y), (xc + cap, y)], style));
                    }
                    let (t, b) = (
                        chart.backend_coord(&(xc, hi)),
                        chart.backend_coord(&(xc, lo)),
                    );
                    pixels[s][g].whisker = Some((t.1, b.1));
                }
                chart.draw_series(whiskers).map_err(draw_err)?;
            }
        }
        // Group names under their groups (the x axis itself carries no numbers).
        let base = area.get_base_pixel();
        let label_y = chart.backend_coord(&(0.0, y0)).1 + 10 - base.1;
        for (g, name) in self.groups.iter().enumerate() {
            let x = chart.backend_coord(&(g as f64 + 0.5, y0)).0 - base.0;
            let style = font(15).pos(Pos::new(HPos::Center, VPos::Top));
            area.draw(&Text::new(name.as_str(), (x, label_y), style))
                .map_err(draw_err)?;
        }
        if self.legend && self.series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(font(14))
                .background_style(WHITE.mix(0.85))
                .border_style(INK)
                .draw()
                .map_err(draw_err)?;
        }
        // Pixels of the whole image (`backend_coord`), also when `area` is one panel.
        Ok(pixels)
    }
}

/// Grouped bars without intervals (one colour per series, one cluster per group).
pub fn render_bar_chart(
    size: (u32, u32),
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(RgbImage, Vec<Vec<BarPixels>>), PlotError> {
    render_interval_bar_chart(size, title, groups, series, None, y_label)
}

/// Grouped bars, each with its 95% interval `(lo, hi)` drawn as a whisker when given.
pub fn render_interval_bar_chart(
    size: (u32, u32),
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    intervals: Option<&[Vec<(f64, f64)>]>,
    y_label: &str,
) -> Result<(RgbImage, Vec<Vec<BarPixels>>), PlotError> {
    let bars = Bars {
        title,
        groups,
        series,
        intervals,
        y_label,
        legend: true,
    };
    bars.check()?;
    render(size, |root| {
        root.fill(&WHITE).map_err(draw_err)?;
        bars.draw(root)
    })
}

pub fn bar_chart(
    path: &Path,
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(), PlotError> {
    bar_chart_sized(path, DEFAULT_SIZE, title, groups, series, y_label)
}

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

/// A bar of a [`Panel`]: its label, value and 95% interval `(lo, hi)` if any.
pub type PanelBar = (String, f64, Option<(f64, f64)>);

/// One panel of [`render_bar_panels`]: one bar per label with its interval.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    /// (bar label, value, 95% interval) in drawing order.
    pub bars: Vec<PanelBar>,
}

/// Several metrics side by side, each panel on its own value axis (POPE F1 near 0.8 and CHAIR_s
/// near 0.3 cannot share one axis without hiding both's differences); one colour per bar label,
/// the same in every panel. Returns each panel's bar pixels.
pub fn render_bar_panels(
    size: (u32, u32),
    title: &str,
    panels: &[Panel],
) -> Result<(RgbImage, Vec<Vec<BarPixels>>), PlotError> {
    if panels.is_empty() {
        return Err(PlotError::Input("panel chart: no panels".into()));
    }
    let names = |p: &Panel| p.bars.iter().map(|b| b.0.clone()).collect::<Vec<_>>();
    if let Some(p) = panels.iter().find(|p| names(p) != names(&panels[0])) {
        return Err(PlotError::Input(format!(
            "panel chart: panel {:?} has bars {:?}, the first {:?} (one legend serves all)",
            p.title,
            names(p),
            names(&panels[0])
        )));
    }
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    render(size, |root| {
        root.fill(&WHITE).map_err(draw_err)?;
        let body = root.titled(title, font(22)).map_err(draw_err)?;
        let height = body.dim_in_pixel().1 as i32;
        let (grid, strip) = body.split_vertically(height - 36);
        // One legend for the figure: the bar colours are the same in every panel.
        let mut x = 16;
        for (i, (name, _, _)) in panels[0].bars.iter().enumerate() {
            strip
                .draw(&Rectangle::new([(x, 10), (x + 14, 24)], colour(i).filled()))
                .map_err(draw_err)?;
            strip
                .draw(&Text::new(name.as_str(), (x + 19, 10), font(14)))
                .map_err(draw_err)?;
            let w = strip
                .estimate_text_size(name, &font(14))
                .map_err(draw_err)?
                .0 as i32;
            x += 19 + w + 18;
        }
        let mut out = Vec::new();
        for (panel, area) in panels.iter().zip(grid.split_evenly((rows, cols))) {
            let groups = vec![String::new()];
            let series: Vec<(String, Vec<f64>)> = panel
                .bars
                .iter()
                .map(|(name, v, _)| (name.clone(), vec![*v]))
                .collect();
            let intervals: Vec<Vec<(f64, f64)>> = panel
                .bars
                .iter()
                .map(|(_, _, iv)| vec![iv.unwrap_or((f64::NAN, f64::NAN))])
                .collect();
            let bars = Bars {
                title: &panel.title,
                groups: &groups,
                series: &series,
                intervals: Some(&intervals),
                y_label: &panel.y_label,
                legend: false,
            };
            bars.check()?;
            let px = bars.draw(&area)?;
            out.push(px.into_iter().map(|v| v[0]).collect());
        }
        Ok(out)
    })
}

/// Writes [`render_bar_panels`].
pub fn bar_panels(
    path: &Path,
    size: (u32, u32),
    title: &str,
    panels: &[Panel],
) -> Result<(), PlotError> {
    let (img, _) = render_bar_panels(size, title, panels)?;
    encode(path, &img)
}

/// Where a point of a line chart was drawn, and its band's ends at the same x.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointPixels {
    pub x: i32,
    pub y: i32,
    pub band: Option<(i32, i32)>,
}

/// Lines (or points), each optionally with a band `(lo, hi)` per point.
fn render_points(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    bands: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
    connect: bool,
) -> Result<(RgbImage, Vec<Vec<PointPixels>>), PlotError> {
    let mut points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if points.is_empty() {
        return Err(PlotError::Input("line chart: no points".into()));
    }
    for (iv, (_, pts)) in bands.iter().zip(series) {
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
    let pad = if x_hi > x_lo {
        0.04 * (x_hi - x_lo)
    } else {
        0.5
    };
    let (y0, y1) = value_axis(points.iter().map(|p| p.1));
    render(size, |root| {
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, font(20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((x_lo - pad)..(x_hi + pad), y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .y_labels(7)
            .max_light_lines(1)
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(font(14))
            .axis_desc_style(font(15))
            .draw()
            .map_err(draw_err)?;
        let mut out = Vec::new();
        for (s, (name, pts)) in series.iter().enumerate() {
            let c = colour(s);
            let band = bands.get(s);
            if let Some(iv) = band {
                // The band: the polygon through every hi, then back through every lo.
                let mut poly: Vec<(f64, f64)> = pts
                    .iter()
                    .zip(iv)
                    .map(|((x, _), (_, hi))| (*x, *hi))
                    .collect();
                poly.extend(pts.iter().zip(iv).rev().map(|((x, _), (lo, _))| (*x, *lo)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.2).filled())))
                    .map_err(draw_err)?;
            }
            let drawn = if connect {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(draw_err)?
            } else {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 2, c.filled())))
                    .map_err(draw_err)?
            };
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], c.filled()));
            if connect {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(draw_err)?;
            }
            out.push(
                pts.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let (x, y) = chart.backend_coord(p);
                        let band = band.and_then(|iv| iv.get(i)).map(|(lo, hi)| {
                            (
                                chart.backend_coord(&(p.0, *hi)).1,
                                chart.backend_coord(&(p.0, *lo)).1,
                            )
                        });
                        PointPixels { x, y, band }
                    })
                    .collect(),
            );
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(14))
            .background_style(WHITE.mix(0.85))
            .border_style(INK)
            .draw()
            .map_err(draw_err)?;
        Ok(out)
    })
}

/// Lines through each series' points.
pub fn render_line_chart(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<(RgbImage, Vec<Vec<PointPixels>>), PlotError> {
    render_points(size, title, series, &[], x_label, y_label, true)
}

pub fn line_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let (img, _) = render_line_chart(DEFAULT_SIZE, title, series, x_label, y_label)?;
    encode(path, &img)
}

pub fn scatter_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let (img, _) = render_points(DEFAULT_SIZE, title, series, &[], x_label, y_label, false)?;
    encode(path, &img)
}

/// Lines with a band per series: `intervals[s][i]` is the `(lo, hi)` of point `i` of series `s`
/// (the paper's sweeps, with each point's 95% interval over seeds).
pub fn render_interval_chart(
    size: (u32, u32),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
) -> Result<(RgbImage, Vec<Vec<PointPixels>>), PlotError> {
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

pub fn interval_chart(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    intervals: &[Vec<(f64, f64)>],
    x_label: &str,
    y_label: &str,
) -> Result<(), PlotError> {
    let (img, _) = render_interval_chart(DEFAULT_SIZE, title, series, intervals, x_label, y_label)?;
    encode(path, &img)
}

#[cfg(test)]
mod tests;
