//! How far a faster precision's answers are from exact fp32's, on the same images: what the
//! `auto` trial keeps a setting by, and what `detectd compare` prints.

use serde::Serialize;

use super::{Detection, Prediction};

/// A reference detection counts when it scores at least this.
pub const MIN_SCORE: f32 = 0.3;
/// A detection matches a reference one with the same label and at least this IoU.
pub const MIN_IOU: f32 = 0.9;

/// Detections of a candidate setting against fp32's, summed over images.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DetectionAgreement {
    /// Reference detections that count (scoring ≥ `MIN_SCORE`, or the best few when fewer).
    pub total: usize,
    /// Of those, how many the candidate has (same label, IoU ≥ `MIN_IOU`).
    pub matched: usize,
    /// Largest difference of a box coordinate between matched pairs, in pixels.
    pub max_box_drift: f32,
    /// Largest score difference between matched pairs.
    pub max_score_drift: f32,
}

impl DetectionAgreement {
    /// The share of counted reference detections matched; 1 when none counted.
    pub fn share(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.matched as f64 / self.total as f64
        }
    }

    /// Adds one image: `reference` (fp32, best first) against `candidate`. References scoring
    /// ≥ `MIN_SCORE` count; when fewer than `at_least` do, the `at_least` best count instead
    /// (a trial image without confident detections still says something).
    pub fn add(&mut self, reference: &[Detection], candidate: &[Detection], at_least: usize) {
        let confident = reference.iter().filter(|d| d.score >= MIN_SCORE).count();
        for r in &reference[..confident.max(at_least.min(reference.len()))] {
            self.total += 1;
            let best = candidate
                .iter()
                .filter(|c| c.label == r.label)
                .map(|c| (iou(&c.bbox, &r.bbox), c))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, c)) = best.filter(|(overlap, _)| *overlap >= MIN_IOU) {
                self.matched += 1;
                let drift = r
                    .bbox
                    .iter()
                    .zip(&c.bbox)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                self.max_box_drift = self.max_box_drift.max(drift);
                self.max_score_drift = self.max_score_drift.max((r.score - c.score).abs());
            }
        }
    }
}

/// Classifier answers of a candidate setting against fp32's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClassAgreement {
    pub images: usize,
    /// Images whose most probable class is the same.
    pub top1: usize,
    /// Images whose five most probable classes are the same set.
    pub top5: usize,
    /// Largest difference of a top-5 class's probability.
    pub max_score_drift: f32,
}

impl ClassAgreement {
    pub fn share(&self) -> f64 {
        if self.images == 0 {
            1.0
        } else {
            self.top1 as f64 / self.images as f64
        }
    }

    /// Adds one image's top classes (best first; five or more for the top-5 figure).
    pub fn add(&mut self, reference: &[Prediction], candidate: &[Prediction]) {
        self.images += 1;
        let label = |p: &[Prediction]| p.first().map(|p| p.label);
        self.top1 += usize::from(label(reference) == label(candidate));
        let set = |p: &[Prediction]| {
            let mut s: Vec<i64> = p.iter().take(5).map(|p| p.label).collect();
            s.sort_unstable();
            s
        };
        self.top5 += usize::from(set(reference) == set(candidate));
        for r in reference.iter().take(5) {
            if let Some(c) = candidate.iter().find(|c| c.label == r.label) {
                self.max_score_drift = self.max_score_drift.max((r.score - c.score).abs());
            }
        }
    }
}

pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(bbox: [f32; 4], score: f32, label: i64) -> Detection {
        Detection {
            bbox,
            score,
            label,
            ..Detection::default()
        }
    }

    #[test]
    fn matches_same_label_and_high_overlap_only() {
        let reference = [
            det([0.0, 0.0, 10.0, 10.0], 0.9, 1),
            det([20.0, 20.0, 40.0, 40.0], 0.8, 2),
            det([50.0, 50.0, 60.0, 60.0], 0.5, 3),
            det([0.0, 0.0, 5.0, 5.0], 0.1, 4),
        ];
        let candidate = [
            det([0.0, 0.0, 10.0, 10.2], 0.85, 1),
            det([20.0, 20.0, 40.0, 40.0], 0.8, 5),
            det([50.0, 50.0, 65.0, 60.0], 0.5, 3),
        ];
        let mut a = DetectionAgreement::default();
        a.add(&reference, &candidate, 0);
        assert_eq!((a.matched, a.total), (1, 3));
        assert!((a.max_box_drift - 0.2).abs() < 1e-5);
        assert!((a.max_score_drift - 0.05).abs() < 1e-6);
        // Without confident references the best few count.
        let mut b = DetectionAgreement::default();
        b.add(&reference[3..], &[], 5);
        assert_eq!((b.matched, b.total), (0, 1));
    }

    #[test]
    fn classes_agree_by_top1_and_top5_set() {
        let p = |labels: &[i64]| -> Vec<Prediction> {
            labels
                .iter()
                .enumerate()
                .map(|(i, &label)| Prediction {
                    label,
                    score: 0.5 - i as f32 * 0.1,
                })
                .collect()
        };
        let mut a = ClassAgreement::default();
        a.add(&p(&[1, 2, 3, 4, 5]), &p(&[1, 3, 2, 4, 5]));
        a.add(&p(&[1, 2, 3, 4, 5]), &p(&[2, 1, 3, 4, 6]));
        assert_eq!((a.images, a.top1, a.top5), (2, 1, 1));
        assert!((a.max_score_drift - 0.1).abs() < 1e-6);
    }
}
