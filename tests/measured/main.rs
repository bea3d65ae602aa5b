//! The tests that measure elapsed time, CPU shares and memory peaks under load. They are a
//! binary of their own because cargo runs test binaries one after another: here they have the
//! machine to themselves (within the binary, `hardening::alone` keeps the timing tests apart).

#[path = "../it/common.rs"]
mod common;

mod hardening;
