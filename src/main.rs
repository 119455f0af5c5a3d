//! The `cras` binary: parses the command line ([`cli`]), sets up logging, runs the
//! subcommand, and turns an error into one line on stderr and exit code 2.

mod cli;

use clap::Parser;
use std::process::ExitCode;

// Training and inference allocate many large, short-lived tensors; glibc's malloc maps
// and unmaps each one (page faults took ~40% of training time). mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc keep the memory a process frees instead of returning it to the OS
/// after its purge delay. A training step frees and re-allocates the same few hundred
/// MB of tensors; purged, they came back as fresh pages the kernel zeroes (20% of an
/// epoch in a profile). The resident size then stays at the peak, which training
/// reaches every step anyway; the daemon keeps the default.
pub(crate) fn keep_freed_memory() {
    // mimalloc.h, `mi_option_e`: `mi_option_purge_delay` is 15 in v2 and v3 (the version
    // libmimalloc-sys builds); -1 means never purge. The C library is linked whole.
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    unsafe extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // SAFETY: sets one integer option; mimalloc reads options atomically.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    // onnxruntime's Microsoft builds start a usage-telemetry client when the library loads
    // (a device id and an event store under ~/.cache/Microsoft, uploads to
    // events.data.microsoft.com), whatever the API says later; this variable stops it.
    // An inspection station sends nothing to anyone.
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        // SAFETY: first statement of main: no other thread exists yet to read the
        // environment concurrently.
        unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    }
    let cli = cli::Cli::parse();
    cli::init_logging(&cli);
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cras: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line. Library errors name their cause in their own
/// message; a cause already said is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}
