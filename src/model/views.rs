//! Test-time views: the graph can score an image as it is and mirrored or turned, and
//! read the views' maps back into one orientation and average them.
//!
//! A model's scores on a mirrored image are not its scores mirrored: the adaptor, the
//! centers and the scorer see other patches beside each patch. Averaging the views
//! keeps what they agree on; a lone hot patch that one orientation raises counts for
//! less. The views are averaged in logit space (the maps are probabilities crowding
//! near 0 and 1, where a plain mean keeps little resolution) and mapped back through
//! the sigmoid, so `anomaly_map`, `patch_scores` and `image_score` stay probabilities.
//! Off by default: on ELPV the views helped painted validation and hurt the test
//! (docs/decisions.md, "Test-time views").

use crate::onnx::{Attr, GraphBuilder};

/// One orientation the graph scores the image in. Each is its own inverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// The image as it is.
    Original,
    /// Mirrored left to right.
    FlipH,
    /// Mirrored top to bottom.
    FlipV,
    /// Turned by 180 degrees (both mirrors).
    Rotate180,
}

impl View {
    fn name(self) -> &'static str {
        match self {
            View::Original => "original",
            View::FlipH => "flip_h",
            View::FlipV => "flip_v",
            View::Rotate180 => "rotate180",
        }
    }

    /// Whether the view reverses rows (top-bottom) and columns (left-right).
    fn reverses(self) -> (bool, bool) {
        match self {
            View::Original => (false, false),
            View::FlipH => (false, true),
            View::FlipV => (true, false),
            View::Rotate180 => (true, true),
        }
    }
}

/// The views a graph scores, the image as it is first (its class choice is the
/// image's). Bundles written before views existed score the original only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<View>", into = "Vec<View>")]
pub struct Views(Vec<View>);

impl Default for Views {
    fn default() -> Self {
        Views(vec![View::Original])
    }
}

impl TryFrom<Vec<View>> for Views {
    type Error = String;
    fn try_from(v: Vec<View>) -> Result<Views, String> {
        let label = || v.iter().map(|x| x.name()).collect::<Vec<_>>().join(",");
        if v.first() != Some(&View::Original) {
            return Err(format!(
                "views {:?}: the first view must be `original` (the image's class is chosen on it)",
                label()
            ));
        }
        if (1..v.len()).any(|i| v[..i].contains(&v[i])) {
            return Err(format!("views {:?}: a view is named twice", label()));
        }
        Ok(Views(v))
    }
}

impl From<Views> for Vec<View> {
    fn from(v: Views) -> Vec<View> {
        v.0
    }
}

impl Views {
    /// Parses `original,rotate180` (names from `original`, `flip_h`, `flip_v`,
    /// `rotate180`; `-` for `_` is accepted).
    pub fn parse(s: &str) -> Result<Views, String> {
        let views = s
            .split(',')
            .map(|name| match name.trim().replace('-', "_").as_str() {
                "original" => Ok(View::Original),
                "flip_h" => Ok(View::FlipH),
                "flip_v" => Ok(View::FlipV),
                "rotate180" => Ok(View::Rotate180),
                other => Err(format!(
                    "views {s:?}: unknown view {other:?} (give original, flip_h, flip_v, rotate180)"
                )),
            })
            .collect::<Result<Vec<View>, String>>()?;
        Views::try_from(views)
    }

    /// The image as it is, alone (the paper's, and older bundles').
    pub fn is_original(&self) -> bool {
        self.0.len() == 1
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The flag's spelling, for logs and model.yaml's options.
    pub fn label(&self) -> String {
        self.0
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The batch the graph runs: [V*N, 3, H, W] from the image input [N, 3, H, W], view
    /// by view. The original alone is `x` itself (the graph is unchanged).
    pub fn expand(&self, g: &mut GraphBuilder, x: &str, h: usize, w: usize) -> String {
        if self.is_original() {
            return x.to_string();
        }
        let views: Vec<String> = self.0.iter().map(|v| orient(g, x, *v, 2, h, w)).collect();
        let refs: Vec<&str> = views.iter().map(String::as_str).collect();
        g.node("Concat", &refs, vec![("axis", Attr::Int(0))])
    }

    /// A [V*N, ..dims] tensor as [V, N, ..dims].
    fn by_view(&self, g: &mut GraphBuilder, x: &str, dims: &[usize]) -> String {
        let mut shape = vec![self.count() as i64, -1];
        shape.extend(dims.iter().map(|d| *d as i64));
        g.reshape(x, &shape)
    }

    /// The original's part of a [V*N, ..dims] tensor: [N, ..dims].
    pub fn first(&self, g: &mut GraphBuilder, x: &str, dims: &[usize]) -> String {
        if self.is_original() {
            return x.to_string();
        }
        let by_view = self.by_view(g, x, dims);
        let zero = g.init_i64("view", &[], vec![0]);
        g.node("Gather", &[&by_view, &zero], vec![("axis", Attr::Int(0))])
    }

    /// The first view's [N] result repeated for every view: [V*N] (each view is judged
    /// against the class the original chose).
    pub fn repeat(&self, g: &mut GraphBuilder, x: &str) -> String {
        if self.is_original() {
            return x.to_string();
        }
        let copies = vec![x; self.count()];
        g.node("Concat", &copies, vec![("axis", Attr::Int(0))])
    }

    /// Combines the views of a [V*N, ..dims] probability map (rows and columns last)
    /// into [N, ..dims]: each view read back into the image's orientation, the mean of
    /// the logits, the sigmoid.
    pub fn combine(&self, g: &mut GraphBuilder, x: &str, dims: &[usize]) -> String {
        if self.is_original() {
            return x.to_string();
        }
        let Some((&w, rest)) = dims.split_last() else {
            return x.to_string();
        };
        let Some(&h) = rest.last() else {
            return x.to_string();
        };
        let by_view = self.by_view(g, x, dims);
        // After taking one view, [N, ..dims]: rows are the second-to-last axis.
        let row_axis = dims.len() as i64 - 1;
        let logits: Vec<String> = (self.0.iter().enumerate())
            .map(|(i, v)| {
                let idx = g.init_i64("view", &[], vec![i as i64]);
                let one = g.node("Gather", &[&by_view, &idx], vec![("axis", Attr::Int(0))]);
                let back = orient(g, &one, *v, row_axis, h, w);
                logit(g, &back)
            })
            .collect();
        // A Views holds at least the original, so the fold starts from a real logit.
        let sum = (logits[1..].iter()).fold(logits[0].clone(), |s, l| g.add(&s, l));
        let inv = g.init_f32("views_inv", &[], vec![1.0 / self.count() as f32]);
        let mean = g.node("Mul", &[&sum, &inv], vec![]);
        g.node("Sigmoid", &[&mean], vec![])
    }
}

/// `x` [.., H, W] (rows on `row_axis`, columns after it) seen in view `v`; every view is
/// its own inverse, so the same reads a view's result back.
fn orient(g: &mut GraphBuilder, x: &str, v: View, row_axis: i64, h: usize, w: usize) -> String {
    let (rows, cols) = v.reverses();
    let mut y = x.to_string();
    for (reverse, axis, len) in [(rows, row_axis, h), (cols, row_axis + 1, w)] {
        if reverse {
            let idx = g.init_i64("reversed", &[len], (0..len as i64).rev().collect());
            y = g.node("Gather", &[&y, &idx], vec![("axis", Attr::Int(axis))]);
        }
    }
    y
}

/// log(p / (1 - p)), with p held inside float32's open unit interval.
fn logit(g: &mut GraphBuilder, p: &str) -> String {
    let lo = g.init_f32("logit_lo", &[], vec![f32::EPSILON]);
    let hi = g.init_f32("logit_hi", &[], vec![1.0 - f32::EPSILON]);
    let p = g.node("Clip", &[p, &lo, &hi], vec![]);
    let one = g.init_f32("one", &[], vec![1.0]);
    let q = g.node("Sub", &[&one, &p], vec![]);
    let lp = g.node("Log", &[&p], vec![]);
    let lq = g.node("Log", &[&q], vec![]);
    g.node("Sub", &[&lp, &lq], vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(Views::parse("original").unwrap(), Views::default());
        let turned = Views(vec![View::Original, View::Rotate180]);
        assert_eq!(Views::parse("original, rotate180").unwrap(), turned);
        assert_eq!(
            Views::parse("original,flip-h,flip_v").unwrap().label(),
            "original,flip_h,flip_v"
        );
        let e = Views::parse("rotate180").unwrap_err();
        assert!(e.contains("first view must be `original`"), "{e}");
        let e = Views::parse("original,flip_h,flip_h").unwrap_err();
        assert!(e.contains("named twice"), "{e}");
        let e = Views::parse("original,rotate90").unwrap_err();
        assert!(e.contains("unknown view \"rotate90\""), "{e}");
        let yaml: Result<Views, _> = serde_saphyr::from_str("[flip_v]");
        assert!(yaml.is_err());
        let yaml: Views = serde_saphyr::from_str("[original, rotate180]").unwrap();
        assert_eq!(yaml, turned);
        assert_eq!(
            serde_saphyr::to_string(&turned).unwrap().trim(),
            "- original\n- rotate180"
        );
    }
}
