//! The integration tests, in one binary so that libtorch is linked once and servers, seeded
//! weights and torchvision references are shared between tests (see `common`). The tests
//! that measure time, CPU shares and memory peaks are in `tests/measured`, which cargo runs
//! after this binary, alone on the machine.

mod common;

mod classifier_parity;
mod cli;
mod cli_batch;
mod detector_parity;
mod fuzz_corpus;
mod grpc;
mod image_formats;
mod in_process;
mod instance_parity;
mod instance_serving;
mod models;
mod openapi;
mod ops_parity;
mod page;
mod precision;
mod precision_auto;
mod render;
mod server;
mod weights_fetch;
mod weights_loading;
