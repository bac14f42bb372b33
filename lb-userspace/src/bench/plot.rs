//! Line charts in SVG, drawn by hand: a few lines, whiskers and labels.

use std::fmt::Write as _;

use super::Stats;

/// One line: a point (median, min–max whisker) per x position, or none.
pub struct Series {
    pub label: String,
    pub points: Vec<Option<Stats>>,
    /// Drawn dashed.
    pub dashed: bool,
    /// Index into the palette.
    pub color: usize,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#555", "#999",
];

/// A chart of `series` over the categories `x_labels`, y from zero.
pub fn line_chart(title: &str, x_title: &str, x_labels: &[String], series: &[Series]) -> String {
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (70.0, 270.0, 30.0, 60.0);
    let max_y = series
        .iter()
        .flat_map(|s| s.points.iter().flatten())
        .map(|p| p.max)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.1;
    let n = x_labels.len();
    let x_of = |i: usize| {
        left + (w - left - right)
            * if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.5
            }
    };
    let y_of = |v: f64| top + (h - top - bottom) * (1.0 - v / max_y);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="18" text-anchor="middle" font-size="14">{title}</text>"#,
        (w - right + left) / 2.0
    );
    for k in 0..=5 {
        let v = max_y * k as f64 / 5.0;
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, label) in x_labels.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            x_of(i),
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{x_title}</text>"#,
        (w - right + left) / 2.0,
        h - 20.0
    );
    for (k, series) in series.iter().enumerate() {
        let color = COLORS[series.color % COLORS.len()];
        let dash = if series.dashed {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let points: Vec<(f64, &Stats)> = series
            .points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (x_of(i), p)))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, p)| format!("{x:.1},{:.1}", y_of(p.median)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for (x, p) in &points {
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}"/><circle cx="{x:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                y_of(p.min),
                y_of(p.max),
                y_of(p.median)
            );
        }
        let (lx, ly) = (w - right + 15.0, top + 10.0 + k as f64 * 20.0);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 25.0,
            lx + 30.0,
            ly + 4.0,
            series.label
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_line_per_series_and_a_point_per_value() {
        let st = |m: f64| Stats {
            min: m - 1.0,
            median: m,
            max: m + 1.0,
        };
        let svg = line_chart(
            "t",
            "x",
            &["10".into(), "1000".into()],
            &[
                Series {
                    label: "a".into(),
                    points: vec![Some(st(5.0)), Some(st(9.0))],
                    dashed: false,
                    color: 0,
                },
                Series {
                    label: "floor".into(),
                    points: vec![Some(st(2.0)), None],
                    dashed: true,
                    color: 1,
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert_eq!(
            svg.matches("stroke-dasharray").count(),
            2,
            "line and legend"
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
