//! Build steps: compile proto/ into the gRPC server and client (with a protoc that ships as a
//! crate, so no protoc is installed by hand), and bake the libtorch library folder into the
//! binary's run path, so `detectd` starts without LD_LIBRARY_PATH. The folder is the one
//! torch-sys linked against (LIBTORCH, from .cargo/config.toml or the environment).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!(
        "cargo:rustc-env=DETECTD_LIBTORCH_VERSION={}",
        libtorch_version()
    );
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = PathBuf::from(root).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    compile_protos()
}

/// The linked libtorch's version, for keys of measurements that depend on it: `version.py`
/// in a Python wheel's torch folder, `build-version` in a libtorch download.
fn libtorch_version() -> String {
    let Ok(root) = std::env::var("LIBTORCH") else {
        return "unknown".into();
    };
    let root = PathBuf::from(root);
    let from_wheel = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches('\'').to_string())
        });
    from_wheel
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
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
