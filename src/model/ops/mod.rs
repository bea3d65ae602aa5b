//! The torchvision ops libtorch lacks (NMS, RoIAlign) and the box utilities around them,
//! written with tensor ops so that they run on whatever device the tensors live on.

pub mod boxes;
pub mod nms;
pub mod roi_align;
mod roi_align_cpu;

pub use nms::{batched_nms, nms};
pub use roi_align::{roi_align, roi_align_gather};
