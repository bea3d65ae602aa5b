//! Build steps: compile proto/ into the gRPC server and client (with a protoc that ships as a
//! crate, so no protoc is installed by hand), and bake the libtorch library folder into the
//! binary's run path, so `detectd` starts without LD_LIBRARY_PATH. The folder is the one
//! torch-sys linked against (LIBTORCH, from .cargo/config.toml or the environment).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = PathBuf::from(root).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    compile_protos()
}

fn compile_protos() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/detectd/v1/detectd.proto";
    println!("cargo:rerun-if-changed={proto}");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("detectd_descriptor.bin"))
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
