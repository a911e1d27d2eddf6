//! Compiles the C++ shim over Gloo (shim/gloo_shim.cc) and links Debian's libgloo.
//!
//! Gloo is a C++ library with templates and exceptions, and no C API: a few `extern
//! "C"` functions written in C++ are the narrowest way to reach it from Rust. The `cc`
//! crate compiles them with the system's C++ compiler and links libstdc++.

fn main() {
    println!("cargo:rerun-if-changed=shim/gloo_shim.cc");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=GLOO_LIB_DIR");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("shim/gloo_shim.cc")
        .warnings(true);
    if let Ok(dir) = std::env::var("GLOO_INCLUDE_DIR") {
        build.include(dir);
    }
    build.compile("kubetune_gloo_shim");
    if let Ok(dir) = std::env::var("GLOO_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
    }
    // Debian's libgloo-dev ships only the shared library (/usr/lib/libgloo.so).
    println!("cargo:rustc-link-lib=dylib=gloo");
}
