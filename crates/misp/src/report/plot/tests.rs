//! The charts say what the numbers say: bar tops, whisker ends and band edges land at the
//! pixels the data put them at, on an axis fitted to the data, and text is really drawn.

use super::*;

fn near(a: i32, b: f64, tol: f64, what: &str) {
    assert!(
        (f64::from(a) - b).abs() <= tol,
        "{what}: pixel {a}, expected {b:.1}"
    );
}

/// Pixels in the top `rows` rows that are dark (text), i.e. the font rendered.
fn dark_pixels(img: &RgbImage, rows: u32) -> usize {
    (0..rows)
        .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|c| *c < 120))
        .count()
}

#[test]
fn value_axis_fits_the_data_not_zero_to_one() {
    // 0.80..0.82, margin 15% of 0.02 each side -> 0.797..0.823, ticks of 0.01.
    let (a, b) = value_axis([0.80, 0.82]);
    assert!(
        (a - 0.79).abs() < 1e-9 && (b - 0.83).abs() < 1e-9,
        "{a} {b}"
    );
    // Near zero: from 0 (bars of small values keep their length), never below it.
    assert_eq!(value_axis([0.05, 0.3]).0, 0.0);
    // Equal values: a span of 5% of their size (1.5), 15% of it each side (29.775..30.225),
    // ticks of 0.1: 29.7..30.3, not a magnified rounding error.
    let (a, b) = value_axis([30.0, 30.0]);
    assert!(
        (a - 29.7).abs() < 1e-9 && (b - 30.3).abs() < 1e-9,
        "{a} {b}"
    );
    // Differences (may be negative): around them.
    let (a, b) = value_axis([-3.0, 1.0]);
    assert!(
        (-5.0..=-3.6).contains(&a) && (1.6..3.0).contains(&b),
        "{a} {b}"
    );
    assert_eq!(nice_range(0.0, 87.0), (0.0, 100.0, 20.0));
}

#[test]
fn bars_and_whiskers_sit_at_the_pixels_of_their_values() {
    let groups = vec!["POPE F1".to_string()];
    let series = vec![
        ("random".to_string(), vec![0.80]),
        ("misp".to_string(), vec![0.82]),
    ];
    let intervals = vec![vec![(0.795, 0.81)], vec![(0.815, 0.828)]];
    let (img, px) = render_interval_bar_chart(
        DEFAULT_SIZE,
        "bars",
        &groups,
        &series,
        Some(&intervals),
        "F1",
    )
    .unwrap();
    assert_eq!(img.dimensions(), DEFAULT_SIZE);
    let (a, b) = (px[0][0], px[1][0]);
    // Values and whiskers span 0.795..0.828 (0.033 < 5% of 0.828 = 0.0414), plus 15% of 0.0414
    // each side: 0.7888..0.8342, on ticks of 0.01: the axis is 0.78..0.84, both bars start at
    // 0.78, and the pixels per unit come from the two bars' tops:
    assert_eq!(a.y_base, b.y_base);
    let per_unit = f64::from(a.y_top - b.y_top) / 0.02;
    assert!(
        per_unit > 1000.0,
        "0.02 apart must show: {per_unit} px per unit"
    );
    let y = |v: f64| f64::from(a.y_base) - (v - 0.78) * per_unit;
    near(a.y_top, y(0.80), 1.5, "random's top");
    near(b.y_top, y(0.82), 1.5, "misp's top");
    let (hi, lo) = a.whisker.unwrap();
    near(hi, y(0.81), 1.5, "random's whisker top");
    near(lo, y(0.795), 1.5, "random's whisker bottom");
    let (hi, lo) = b.whisker.unwrap();
    near(hi, y(0.828), 1.5, "misp's whisker top");
    near(lo, y(0.815), 1.5, "misp's whisker bottom");
    // The image holds them: whisker ink at its ends (above the bar for random), bar colour
    // beside it, background above the whisker.
    for (s, p) in [a, b].iter().enumerate() {
        let xc = (p.x0 + p.x1) / 2;
        let (hi, _) = p.whisker.unwrap();
        let ink = |x: i32, y: i32| *img.get_pixel(x as u32, y as u32) == WHISKER;
        assert!(
            (hi - 1..=hi + 1).any(|y| (xc - 2..=xc + 2).any(|x| ink(x, y))),
            "no whisker cap at y {hi} for series {s}"
        );
        let inside = img.get_pixel((p.x0 + 2) as u32, ((p.y_top + p.y_base) / 2) as u32);
        assert_eq!(*inside, series_color(s), "bar {s} colour");
        assert_eq!(*img.get_pixel(xc as u32, (hi - 12) as u32), BACKGROUND);
    }
    assert!(dark_pixels(&img, 40) > 50, "the title is drawn");
}

#[test]
fn panels_each_get_their_own_axis() {
    let bars = |v: [f64; 2]| {
        vec![
            ("base".to_string(), v[0], Some((v[0] - 0.01, v[0] + 0.01))),
            ("misp".to_string(), v[1], None),
        ]
    };
    let panels = vec![
        Panel {
            title: "POPE F1".into(),
            y_label: "F1".into(),
            bars: bars([0.80, 0.82]),
        },
        Panel {
            title: "CHAIR_s".into(),
            y_label: "share".into(),
            bars: bars([0.30, 0.20]),
        },
    ];
    let path = std::env::temp_dir().join(format!("misp-plot-{}-panels.png", std::process::id()));
    bar_panels(&path, DEFAULT_SIZE, "results", &panels).unwrap();
    let (img, px) = render_bar_panels(DEFAULT_SIZE, "results", &panels).unwrap();
    let file = image::open(&path).unwrap().to_rgb8();
    assert_eq!(
        file.as_raw(),
        img.as_raw(),
        "the file holds what was rendered"
    );
    if std::env::var_os("MISP_KEEP_PLOTS").is_none() {
        std::fs::remove_file(&path).unwrap();
    }
    // Panel 2 lies right of panel 1; in each the taller bar is the larger value.
    assert!(px[1][0].x0 > px[0][1].x1);
    assert!(px[0][1].y_top < px[0][0].y_top);
    assert!(px[1][1].y_top > px[1][0].y_top);
    // Panel 1's 0.02 difference is drawn larger than a 0-1 axis would (~450 px tall plot:
    // 9 px); its axis is fitted to 0.79..0.83.
    assert!(px[0][0].y_top - px[0][1].y_top > 60);
    // Only the bar with an interval has a whisker.
    assert!(px[0][0].whisker.is_some() && px[0][1].whisker.is_none());
    let legend_rows = img.height() - 18;
    let colour_at_legend = (0..img.width())
        .filter(|&x| *img.get_pixel(x, legend_rows) == series_color(1))
        .count();
    assert!(colour_at_legend >= 10, "the legend swatch of misp");
    let mut other = panels.clone();
    other[1].bars[1].0 = "random".into();
    let err = render_bar_panels(DEFAULT_SIZE, "x", &other).unwrap_err();
    assert!(err.to_string().contains("one legend serves all"), "{err}");
}

#[test]
fn band_chart_shades_between_the_interval_ends() {
    let series = vec![(
        "misp".to_string(),
        vec![(0.1, 50.0), (0.5, 60.0), (1.0, 55.0)],
    )];
    let intervals = vec![vec![(40.0, 55.0), (58.0, 62.0), (50.0, 61.0)]];
    let (img, px) =
        render_interval_chart(DEFAULT_SIZE, "sweep", &series, &intervals, "beta", "F1").unwrap();
    if std::env::var_os("MISP_KEEP_PLOTS").is_some() {
        let path = std::env::temp_dir().join(format!("misp-plot-{}-band.png", std::process::id()));
        encode(&path, &img).unwrap();
    }
    let p = px[0][0];
    let (top, bottom) = p.band.unwrap();
    // 50 within 40..55: the point is 2/3 of the way from the band's bottom to its top.
    near(
        p.y,
        f64::from(bottom) + (f64::from(top - bottom)) * 10.0 / 15.0,
        1.5,
        "point",
    );
    // The band: 20% of the series colour over white, inside; none of it well outside.
    let c = series_color(0).0;
    let tint = |k: usize| (255.0 * 0.8 + f64::from(c[k]) * 0.2) as i32;
    let tinted = |x: i32, y: i32| {
        let q = img.get_pixel(x as u32, y as u32).0;
        (0..3).all(|k| (i32::from(q[k]) - tint(k)).abs() <= 3)
    };
    let x = p.x + 8;
    let inside = (top + 4..bottom - 4).filter(|&y| tinted(x, y)).count();
    assert!(
        inside as i32 > (bottom - top) / 2,
        "{inside} tinted of {}",
        bottom - top
    );
    assert!(
        (bottom + 6..bottom + 30).all(|y| !tinted(x, y)),
        "tint below the band"
    );
    // Mismatched intervals are an error, not a silent plot.
    assert!(render_interval_chart(DEFAULT_SIZE, "x", &series, &[vec![]], "a", "b").is_err());
}

#[test]
fn line_chart_puts_points_in_data_order_and_writes_a_png() {
    let path = std::env::temp_dir().join(format!("misp-plot-{}-line.png", std::process::id()));
    let series = vec![(
        "loss".to_string(),
        vec![(0.0, 1.0), (10.0, 0.5), (20.0, 0.25)],
    )];
    line_chart(&path, "Training", &series, "step", "loss").unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    let (rendered, px) =
        render_line_chart(DEFAULT_SIZE, "Training", &series, "step", "loss").unwrap();
    assert_eq!(
        rendered.as_raw(),
        img.as_raw(),
        "the file holds what was rendered"
    );
    let p = &px[0];
    assert!(p[0].x < p[1].x && p[1].x < p[2].x);
    assert!(
        p[0].y < p[1].y && p[1].y < p[2].y,
        "lower loss is lower on the chart"
    );
    // Equal steps in x are equal in pixels; the y drop 1.0 -> 0.5 is twice 0.5 -> 0.25.
    assert!(((p[1].x - p[0].x) - (p[2].x - p[1].x)).abs() <= 1);
    near(
        p[1].y - p[0].y,
        2.0 * f64::from(p[2].y - p[1].y),
        2.0,
        "y scale",
    );
    assert_eq!(
        *img.get_pixel(p[1].x as u32, p[1].y as u32),
        series_color(0)
    );
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
    let err = render_interval_bar_chart(
        (200, 100),
        "t",
        &groups,
        &[("s".into(), vec![1.0])],
        Some(&[]),
        "y",
    )
    .unwrap_err();
    assert!(err.to_string().contains("one (lo, hi) per value"), "{err}");
}
