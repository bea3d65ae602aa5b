//! detectd: torchvision-exact Faster R-CNN (ResNet-50-FPN v1/v2) and ResNet-50 on libtorch.
//!
//! Layers, inner to outer: `weights` (checkpoint files) → `model` (tensors only) → `batch`
//! (queue and worker thread, model-agnostic) → `service` (decode, queue, wait) → `http`
//! (axum edge, no tensors) and `cli`.

pub mod alloc;
pub mod api;
pub mod batch;
pub mod cli;
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod imaging;
pub mod labels;
pub mod metrics;
pub mod model;
pub mod render;
pub mod rle;
pub mod service;
pub mod weights;
