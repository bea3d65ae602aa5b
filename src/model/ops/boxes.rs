//! `torchvision.ops.boxes` and `det_utils.BoxCoder`, op for op (f32, no "+1" anywhere).

use tch::{IndexOp, Tensor};

/// ln(1000 / 16): the cap on predicted log-scale size changes.
const BBOX_XFORM_CLIP: f64 = 4.135166556742356;

/// Box-regression weights: (1, 1, 1, 1) in the RPN, (10, 10, 5, 5) in the box head.
#[derive(Clone, Copy)]
pub struct BoxCoder {
    pub weights: [f64; 4],
}

impl BoxCoder {
    /// Applies `rel` `[K, 4·C]` to reference boxes `[K, 4]`, giving `[K, C, 4]`.
    pub fn decode(&self, rel: &Tensor, boxes: &Tensor) -> Tensor {
        let [wx, wy, ww, wh] = self.weights;
        let widths = boxes.i((.., 2)) - boxes.i((.., 0));
        let heights = boxes.i((.., 3)) - boxes.i((.., 1));
        let ctr_x = boxes.i((.., 0)) + &widths * 0.5;
        let ctr_y = boxes.i((.., 1)) + &heights * 0.5;
        let every4 = |k: i64| rel.slice(1, k, None, 4);
        let dx = every4(0) / wx;
        let dy = every4(1) / wy;
        let dw = (every4(2) / ww).clamp_max(BBOX_XFORM_CLIP);
        let dh = (every4(3) / wh).clamp_max(BBOX_XFORM_CLIP);
        let pred_ctr_x = dx * widths.unsqueeze(1) + ctr_x.unsqueeze(1);
        let pred_ctr_y = dy * heights.unsqueeze(1) + ctr_y.unsqueeze(1);
        let half_w = dw.exp() * widths.unsqueeze(1) * 0.5;
        let half_h = dh.exp() * heights.unsqueeze(1) * 0.5;
        Tensor::stack(
            &[
                &pred_ctr_x - &half_w,
                &pred_ctr_y - &half_h,
                &pred_ctr_x + &half_w,
                &pred_ctr_y + &half_h,
            ],
            2,
        )
    }
}

/// Clamps x to [0, width] and y to [0, height]; works on `[..., 4]`.
pub fn clip_to_image(boxes: &Tensor, height: i64, width: i64) -> Tensor {
    let xs = boxes.slice(-1, 0, None, 2).clamp(0, width);
    let ys = boxes.slice(-1, 1, None, 2).clamp(0, height);
    Tensor::stack(&[xs, ys], -1).reshape(boxes.size())
}

/// Indices of boxes at least `min_size` wide and high.
pub fn remove_small(boxes: &Tensor, min_size: f64) -> Tensor {
    let ws = boxes.i((.., 2)) - boxes.i((.., 0));
    let hs = boxes.i((.., 3)) - boxes.i((.., 1));
    ws.ge(min_size)
        .logical_and(&hs.ge(min_size))
        .nonzero()
        .squeeze_dim(1)
}

/// `(x2 - x1) * (y2 - y1)`.
pub fn area(boxes: &Tensor) -> Tensor {
    (boxes.i((.., 2)) - boxes.i((.., 0))) * (boxes.i((.., 3)) - boxes.i((.., 1)))
}
