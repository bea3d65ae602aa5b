//! detectd: torchvision-exact Faster R-CNN (ResNet-50-FPN v1/v2) and ResNet-50 on libtorch.
//!
//! Layers, inner to outer: `weights` (checkpoint files) → `model` (tensors only) → `cli`
//! (files and JSON lines).

pub mod api;
pub mod cli;
pub mod imaging;
pub mod labels;
pub mod model;
pub mod weights;
